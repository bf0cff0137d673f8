"""Under CI (CI=true) a missing peer venv or missing LUME data fails the run; locally it skips.

Runs pytest in a subprocess on a copy of this conftest placed in an empty repository layout, so the
peer venv ($UMERGE_PEERS) and the LUME data (../shared/data/lume) are both missing there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PROBE = '''
from conftest import needs_lume


def test_needs_the_peer_venv(peers):
    pass


@needs_lume
def test_needs_lume():
    pass
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "conftest.py", tests / "conftest.py")
    (tests / "test_probe.py").write_text(PROBE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"UMERGE_PEERS": str(tmp_path / "no-peers"), "PYTHONPATH": str(HERE.parent / "python")})
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True, cwd=tmp_path / "repo", env=env, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_inputs_skip_with_the_reason_outside_ci(tmp_path: Path, ci: str | None) -> None:
    proc = _run(tmp_path, ci)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 skipped" in proc.stdout
    assert "mergekit not found" in proc.stdout and "LUME data not found" in proc.stdout
    assert "parity tests run: 0 against mergekit (0 passed, 0 failed, 1 skipped)" in proc.stdout


def test_missing_inputs_fail_under_ci(tmp_path: Path) -> None:
    proc = _run(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 error" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
    assert "mergekit not found" in proc.stdout and "LUME data not found" in proc.stdout
    assert "CI=true: this input is required" in proc.stdout
    assert "parity tests run: 1 against mergekit (0 passed, 1 failed, 0 skipped)" in proc.stdout
