"""The Packer template: formatted, valid for the packer installed here, and shaped as the image
needs (parsed with python-hcl2).

Debian's packer is 1.6.6. It predates `required_plugins` and the amazon plugin's IMDS options,
so it validates a copy without exactly those parts (and fails the test if it rejects anything
else); the structural tests below check those parts instead.
"""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import hcl2
import pytest

from tests.servers import ROOT

TEMPLATE = ROOT / "packer.pkr.hcl"
LOCK = ROOT / "ami" / "requirements-vllm.lock"
CPU_LOCK = ROOT / "ami" / "requirements-vllm-cpu.lock"

pytestmark = pytest.mark.skipif(shutil.which("packer") is None, reason="needs packer")


def packer_version() -> tuple[int, ...]:
    out = subprocess.run(["packer", "version"], capture_output=True, text=True).stdout
    return tuple(int(p) for p in re.search(r"(\d+)\.(\d+)\.(\d+)", out).groups())


def without_block(text: str, header: str) -> str:
    """``text`` less the block that opens with ``header`` (a line such as ``packer {``)."""
    start = text.index(header)
    depth, i = 0, start
    while True:
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[:start] + text[i + 1 :]
        i += 1


def for_old_packer(text: str) -> str:
    """What packer before 1.7 can read: no plugin requirements, no IMDS options."""
    text = without_block(text, "packer {")
    text = without_block(text, "metadata_options {")
    text, count = re.subn(r"(?m)^\s*imds_support\s*=.*\n", "", text)
    assert count == 1
    return text


def strip(value):
    """python-hcl2's output with quotes and bookkeeping keys removed."""
    if isinstance(value, dict):
        return {
            strip(k): strip(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [strip(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="module")
def template() -> dict:
    with TEMPLATE.open() as f:
        return strip(hcl2.load(f))


def blocks(template: dict, kind: str) -> dict:
    """Labelled blocks of one kind (variable, source...) by label."""
    merged: dict = {}
    for entry in template.get(kind, []):
        merged.update(entry)
    return merged


def run_validate(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Validate the template in a directory that mirrors the repository's uploaded paths."""
    text = TEMPLATE.read_text()
    if packer_version() < (1, 7, 0):
        text = for_old_packer(text)
    (tmp_path / "packer.pkr.hcl").write_text(text)
    for entry in ROOT.iterdir():
        if entry.name not in ("packer.pkr.hcl", ".git") and not entry.name.startswith(".venv"):
            (tmp_path / entry.name).symlink_to(entry)
    return subprocess.run(
        ["packer", "validate", *extra, "packer.pkr.hcl"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_template_is_formatted():
    done = subprocess.run(
        ["packer", "fmt", "-check", "-diff", str(TEMPLATE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_template_validates(tmp_path):
    done = run_validate(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_choice_is_validated(tmp_path):
    done = run_validate(tmp_path, "-var", "base_image=centos-7")
    assert done.returncode != 0
    assert "must be ubuntu-24.04, dlami or debian-12" in done.stdout + done.stderr


def test_cpu_flavour_validates_and_others_are_refused(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "tpu").mkdir()
    done = run_validate(tmp_path / "cpu", "-var", "flavor=cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_validate(tmp_path / "tpu", "-var", "flavor=tpu")
    assert done.returncode != 0
    assert "flavor must be gpu or cpu" in done.stdout + done.stderr


def test_flavour_picks_base_image_and_instance_type(template):
    variables = blocks(template, "variable")
    assert variables["flavor"]["default"] == "gpu"
    assert variables["base_image"]["default"] == variables["instance_type"]["default"] == ""
    local = template["locals"][0]
    assert "debian-12" in local["base_image"] and "ubuntu-24.04" in local["base_image"]
    assert re.search(r'"cpu" \? "c7i\.\w+" : "g[56]\.\w+"', local["instance_type"])
    debian = local["base_images"]["debian-12"]
    assert debian["owners"] == ["136693071363"]  # Debian's cloud team
    assert debian["ssh_username"] == "admin"


def test_every_script_gets_the_flavour(template):
    for provisioner in template["build"][0]["provisioner"]:
        shell = provisioner.get("shell", {})
        if shell.get("scripts"):
            assert "FLAVOR=${var.flavor}" in shell["environment_vars"], shell["scripts"]


def test_old_packer_rejects_only_what_the_copy_leaves_out():
    if packer_version() >= (1, 7, 0):
        pytest.skip("this packer reads the whole template")
    done = subprocess.run(
        ["packer", "validate", "-syntax-only", str(TEMPLATE)], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "required_plugins" in done.stdout + done.stderr


def test_amazon_plugin_is_required(template):
    plugins = template["packer"][0]["required_plugins"][0]
    assert plugins["amazon"]["source"] == "github.com/hashicorp/amazon"


def test_variables_operators_set(template):
    variables = blocks(template, "variable")
    for name in (
        "region",
        "instance_type",
        "volume_size_gb",
        "base_image",
        "vllm_version",
        "model",
    ):
        assert name in variables, name
    assert variables["model"]["default"] == ""
    assert variables["hf_token"]["sensitive"] is True


def test_source_is_ubuntu_from_canonical_on_gp3_with_imdsv2(template):
    source = blocks(template, "source")["amazon-ebs"]["appliance"]
    base_images = template["locals"][0]["base_images"]
    assert base_images["ubuntu-24.04"]["owners"] == ["099720109477"]  # Canonical
    assert "ubuntu-noble-24.04-amd64-server" in base_images["ubuntu-24.04"]["name"]
    assert "Deep Learning Base" in base_images["dlami"]["name"]
    assert source["source_ami_filter"][0]["most_recent"] is True
    disk = source["launch_block_device_mappings"][0]
    assert disk["volume_type"] == "gp3" and "throughput" in disk
    assert source["metadata_options"][0]["http_tokens"] == "required"
    assert source["imds_support"] == "v2.0"


def provisioner_scripts(template: dict) -> list[str]:
    build = template["build"][0]
    scripts = []
    for provisioner in build["provisioner"]:
        shell = provisioner.get("shell")
        if shell:
            scripts += [s.replace("${path.root}/", "") for s in shell.get("scripts", [])]
    return scripts


def test_every_provisioning_script_is_run_in_order_and_exists(template):
    scripts = provisioner_scripts(template)
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "ami").glob("*.sh"))
    assert scripts == on_disk
    for script in scripts:
        text = (ROOT / script).read_text()
        assert "set -euo pipefail" in text, script


def test_uploaded_paths_exist(template):
    for path in template["locals"][0]["source_paths"]:
        assert (ROOT / path).exists(), path


def test_every_package_the_image_installs_is_uploaded(template):
    """pip installs what pyproject names; a package left out of the upload is silently missing
    from the image, its console scripts failing at import."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = [pattern.rstrip("*") for pattern in find["find"]["include"]]
    uploaded = template["locals"][0]["source_paths"]
    assert [p for p in packages if p not in uploaded] == []


def test_lock_pins_the_templates_vllm_with_hashes(template):
    version = blocks(template, "variable")["vllm_version"]["default"]
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert f"vllm=={version}" in {line.split()[0] for line in lines}
    for line in lines:
        assert re.match(r"^[a-z0-9._-]+==\S+ --hash=sha256:[0-9a-f]{64}$", line), line
    pinned = {line.split("==")[0] for line in lines}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.match(r"^[A-Za-z0-9._-]+", dep).group(0)).lower()
        assert name in pinned, f"{name} (a project dependency) is not in the lock"


def test_cpu_lock_pins_vllm_cpu_and_torchs_cpu_build_with_hashes(template):
    version = blocks(template, "variable")["vllm_version"]["default"]
    assert "for Python 3.11.2," in CPU_LOCK.read_text().splitlines()[0]  # Debian 12's
    lines = [line for line in CPU_LOCK.read_text().splitlines() if line and line[0] != "#"]
    pins = {line.split("==")[0]: line.split("==")[1].split()[0] for line in lines}
    assert pins["vllm-cpu"] == version
    assert pins["torch"].endswith("+cpu")
    assert "vllm" not in pins and not any(name.startswith("nvidia-cu") for name in pins)
    # CUDA builds that break `import transformers`; text models never use them.
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)
    for line in lines:
        assert re.match(r"^[a-z0-9._-]+==\S+ --hash=sha256:[0-9a-f]{64}$", line), line
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"^[A-Za-z0-9._-]+", dep).group(0)).lower()
        assert name in pins, f"{name} (a project dependency) is not in the cpu lock"
    assert "setuptools" in pins


def test_app_install_refuses_a_lock_for_another_python(template, tmp_path):
    """The cpu lock is for Debian 12's Python: another base image stops before installing."""
    fake_python = tmp_path / "python3"
    fake_python.write_text("#!/bin/sh\necho 3.12\n")
    fake_python.chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / "ami" / "40-app.sh")],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "APPLIANCE_SRC": str(ROOT), "FLAVOR": "cpu",
             "VLLM_VERSION": blocks(template, "variable")["vllm_version"]["default"]},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "vllm-cpu.lock is for Python 3.11.2, this base image has 3.12" in done.stderr


def test_app_install_refuses_a_vllm_the_lock_does_not_pin():
    """A -var vllm_version the lock does not pin stops the build before anything is installed."""
    done = subprocess.run(
        ["bash", str(ROOT / "ami" / "40-app.sh")],
        env={"PATH": "/usr/bin:/bin", "APPLIANCE_SRC": str(ROOT), "VLLM_VERSION": "0.0.1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "does not pin vllm==0.0.1" in done.stderr


def test_driver_branch_runs_the_locked_cuda_runtime(template):
    """CUDA 13 needs driver 580 or newer, CUDA 12 needs 525 or newer."""
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.", LOCK.read_text(), re.M)
    assert runtime, "the lock pins no CUDA runtime"
    needs = {12: 525, 13: 580}[int(runtime.group(1))]
    branch = int(blocks(template, "variable")["nvidia_driver_branch"]["default"])
    assert branch >= needs
