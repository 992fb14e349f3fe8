"""Every shell script in the repository is shellcheck clean and fails fast (set -euo pipefail)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.servers import ROOT

SKIP_DIRS = {".git", ".run", ".image", "node_modules", "__pycache__"}
"""Not the project's: .image holds the image test's Debian root file systems."""
SHEBANG = re.compile(rb"^#!\s*/(usr/)?bin/(env\s+)?(ba)?sh\b")


def shell_scripts() -> list[Path]:
    """Files named *.sh, or whose first line starts a shell, outside virtualenvs and state."""
    found, paths = [], []
    for directory, subdirs, files in os.walk(ROOT):
        # Pruned, not filtered: .image alone holds gigabytes of someone else's files.
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".venv")]
        for name in files:
            path = Path(directory) / name
            if path.is_file():
                paths.append(path)
    for path in sorted(paths):
        with path.open("rb") as f:
            first = f.readline()
        if path.suffix == ".sh" or SHEBANG.match(first):
            found.append(path)
    return found


SCRIPTS = shell_scripts()


def test_scripts_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {
        ".ci/run",
        "appliance_ops/tools/smoke-test.sh",
        "appliance_ops/tools/appliance-status",
        "ami/40-app.sh",
    } <= names


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_shellcheck_is_clean():
    done = subprocess.run(
        ["shellcheck", "--external-sources", *map(str, SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_fails_fast(script):
    assert "set -euo pipefail" in script.read_text()
