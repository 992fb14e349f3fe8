"""``appliance-engine --plan`` against two tiny models on disk: what each replica would get.

The models are real directories written by ``scripts/make_tiny_model.py`` (it needs the
engine's virtualenv: ``make engine-venv``, or ``ENGINE_VENV`` pointing at one); the host is
stood in for where it matters (vLLM's CPU build and 16 GiB free, or four GPUs).
"""

import json
from pathlib import Path

import pytest

from server import main as launcher
from server.gpus import Gpu
from tests.e2e.engine_stack import ENGINE_BIN, make_tiny_model

GIB = 2**30


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    if not (ENGINE_BIN / "python").exists():
        pytest.skip(f"no engine virtualenv at {ENGINE_BIN.parent}: run `make engine-venv`")
    root = tmp_path_factory.mktemp("models")
    return [make_tiny_model(root / f"tiny-{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture
def host(monkeypatch, tmp_path, tiny_models):
    """A CPU host with a models file naming both tiny models; nothing else configured."""
    for name in ("APPLIANCE_MODEL", "APPLIANCE_ENGINE_PORT", "APPLIANCE_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        f'[[models]]\nname = "chat"\nsource = "{tiny_models[0]}"\nmax_model_len = 1024\n\n'
        f'[[models]]\nname = "other"\nsource = "{tiny_models[1]}"\nreplicas = "auto"\n'
    )
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(tmp_path / "absent.env"))
    monkeypatch.setenv("APPLIANCE_MODELS_FILE", str(models_file))
    monkeypatch.setattr(launcher, "detect_gpus", list)
    monkeypatch.setattr(launcher, "installed_vllm", lambda: "cpu")
    monkeypatch.setattr(launcher, "available_memory_bytes", lambda: 16 * GIB)
    monkeypatch.setattr(launcher, "fetch_model", pytest.fail)
    monkeypatch.setattr(launcher.os, "execve", pytest.fail)
    return monkeypatch


def test_two_tiny_models_on_cpu_get_one_replica_each_on_consecutive_ports(host, capsys):
    assert launcher.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "device: cpu\n"
        "chat (generate): tensor parallel size 1, 1 replica\n"
        "  replica 0: port 8000, CPU, KV cache "
    )
    assert "other (generate): tensor parallel size 1, 1 replica\n  replica 0: port 8001, CPU" in out
    assert "other: replicas = 'auto' asked for; on CPU every model runs one replica" in out


def test_the_same_models_on_four_gpus(host, capsys):
    host.setattr(launcher, "installed_vllm", lambda: "gpu")
    host.setattr(launcher, "detect_gpus", lambda: [Gpu(i, "L4", 22 * GIB) for i in range(4)])
    host.setenv("APPLIANCE_ENGINE_PORT", "9000")
    assert launcher.main(["--plan"]) == 0
    out = capsys.readouterr().out
    # "chat" asks for one replica; "other", replicas "auto", takes the GPUs left
    assert "chat (generate): tensor parallel size 1, 1 replica\n" \
           "  replica 0: port 9000, GPU 0, memory fraction 0.90\n" in out
    assert "other (generate): tensor parallel size 1, 3 replicas\n" \
           "  replica 0: port 9001, GPU 1, memory fraction 0.90\n" \
           "  replica 1: port 9002, GPU 2, memory fraction 0.90\n" \
           "  replica 2: port 9003, GPU 3, memory fraction 0.90\n" in out


def test_appliance_model_alone_is_a_one_model_plan(host, tiny_models, tmp_path, capsys):
    host.setenv("APPLIANCE_MODELS_FILE", str(tmp_path / "absent.toml"))
    host.setenv("APPLIANCE_MODEL", str(tiny_models[0]))
    assert launcher.main(["--plan"]) == 0
    captured = capsys.readouterr()
    assert "tiny-0 (generate): tensor parallel size 1, 1 replica\n  replica 0: port 8000, CPU" \
        in captured.out
    assert "there is no models file" in captured.err


def test_a_bad_models_file_exits_2_naming_the_model_and_key(host, tmp_path, capsys):
    (tmp_path / "models.toml").write_text('[[models]]\nname = "m"\nsource = "/m"\nreplica = 2\n')
    assert launcher.main(["--plan"]) == launcher.EXIT_PREFLIGHT
    assert "cannot start: " in (err := capsys.readouterr().err)
    assert "model 'm': unknown key 'replica' (did you mean 'replicas'?)" in err


def test_a_remote_model_not_fetched_yet_is_named_not_fetched(host, tmp_path, capsys):
    (tmp_path / "models.toml").write_text('[[models]]\nname = "m"\nsource = "org/model"\n')
    host.setenv("APPLIANCE_MODEL_CACHE", str(tmp_path / "cache"))
    assert launcher.main(["--plan"]) == launcher.EXIT_PREFLIGHT
    err = capsys.readouterr().err
    assert "cannot start: m: org/model is not fetched yet" in err


def test_models_that_do_not_fit_exit_2_with_the_plan_and_the_numbers(host, capsys):
    host.setattr(launcher, "installed_vllm", lambda: "gpu")
    host.setattr(launcher, "detect_gpus", lambda: [Gpu(0, "tiny", GIB)])
    assert launcher.main(["--plan"]) == launcher.EXIT_PREFLIGHT
    out = capsys.readouterr().out
    assert "cannot start:\n  chat: its weights" in out


def test_a_replica_starts_its_model_on_its_port_with_its_share(host, capsys, tiny_models):
    """``--replica N`` is the one vLLM of replica N: its model, name, port and KV share."""
    host.setattr(launcher, "fetch_model", lambda source, cache: Path(source))
    assert launcher.main(["--replica", "1", "--dry-run"]) == 0
    err = capsys.readouterr().err
    command = next(line for line in err.splitlines() if "vLLM command:" in line)
    assert f"--model {tiny_models[1]}" in command and "--served-model-name other" in command
    assert "--port 8001" in command and "--kv-cache-memory-bytes" in command
    assert "replica 1: other on port 8001" in err


def test_a_replica_the_plan_does_not_have_is_refused(host, capsys):
    host.setattr(launcher, "fetch_model", lambda source, cache: Path(source))
    assert launcher.main(["--replica", "2", "--dry-run"]) == 2
    assert "the plan has 2 replicas (0 to 1), not 2" in capsys.readouterr().err


def test_an_embedding_replica_runs_vllms_pooling_runner(host, capsys, tmp_path, tiny_models):
    host.setattr(launcher, "fetch_model", lambda source, cache: Path(source))
    models_file = tmp_path / "embed.toml"
    models_file.write_text(f'[[models]]\nname = "emb"\nsource = "{tiny_models[0]}"\n'
                           'task = "embed"\n')
    host.setenv("APPLIANCE_MODELS_FILE", str(models_file))
    assert launcher.main(["--replica", "0", "--dry-run"]) == 0
    assert "--runner pooling" in capsys.readouterr().err


def test_replicas_are_listed_for_scripts(host, capsys):
    assert launcher.main(["--list-replicas"]) == 0
    assert capsys.readouterr().out == "0 chat 8000\n1 other 8001\n"


def test_a_replica_loads_its_models_adapters_and_only_its_own(host, capsys, tmp_path,
                                                             tiny_models):
    """The models file's adapters and the adapters list's, for the replica's model only; a
    model without adapters starts without LoRA (it reserves memory)."""
    host.setattr(launcher, "fetch_model", lambda source, cache: Path(source))
    adapters = {}
    for name in ("static", "listed"):
        adapters[name] = tmp_path / name
        adapters[name].mkdir()
        (adapters[name] / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    models_file = tmp_path / "lora.toml"
    models_file.write_text(
        f'[[models]]\nname = "chat"\nsource = "{tiny_models[0]}"\n'
        f'adapters = [{{name = "static", source = "{adapters["static"]}"}}]\n\n'
        f'[[models]]\nname = "other"\nsource = "{tiny_models[1]}"\n')
    listed = tmp_path / "adapters.json"
    listed.write_text(json.dumps({"adapters": [
        {"name": "listed", "source": str(adapters["listed"]), "base": "chat"}]}))
    host.setenv("APPLIANCE_MODELS_FILE", str(models_file))
    host.setenv("APPLIANCE_ADAPTERS_FILE", str(listed))
    assert launcher.main(["--replica", "0", "--dry-run"]) == 0
    command = next(line for line in capsys.readouterr().err.splitlines()
                   if "vLLM command:" in line)
    assert (f"--enable-lora --lora-modules static={adapters['static']} "
            f"listed={adapters['listed']}") in command
    assert launcher.main(["--replica", "1", "--dry-run"]) == 0
    assert "--enable-lora" not in capsys.readouterr().err
