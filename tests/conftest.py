"""Shared pytest fixtures: synthetic checkpoints, the `umerge` command, the peer (mergekit) venv and
the LUME data.

Checkpoints come from `umerge.synthetic` (seeded, written in the Hugging Face layout); the merge
engine is reached through its public surfaces only: the `umerge` command and `umerge.ties`.

Inputs that live outside the repository (the peer venv, the LUME data) are optional locally: a test
that needs a missing one skips and says why. Under CI (`CI=true`) it fails instead, so CI cannot
quietly test less. The run ends with one line counting the parity tests against mergekit and PEFT.
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from umerge.synthetic import TINY_ODD, CheckpointSpec, make_family

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can `import reference_merge`

#: Under CI a missing test input is a failure, not a skip.
IN_CI = os.environ.get("CI") == "true"

#: The real LUME / SemEval-2025 Task 4 splits, read in place beside the repository, never copied.
LUME = REPO.parent / "shared" / "data" / "lume"


def missing_input(what: str, reason: str) -> NoReturn:
    """`what` cannot run because an input outside the repository is missing (`reason`): fails under
    CI (CI=true), skips elsewhere, printing the reason either way."""
    print(f"\n{'FAIL' if IN_CI else 'SKIP'} {what}: {reason}", file=sys.stderr)
    if IN_CI:
        pytest.fail(f"{what}: {reason} (CI=true: this input is required)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lume_dir() -> Path:
    """The LUME data directory; skips locally (fails under CI) when it is not there."""
    if not (LUME / "forget.jsonl").is_file():
        missing_input("tests on the LUME data", f"LUME data not found at {LUME}")
    return LUME


#: Marks a test (or, as `pytestmark`, a module) that reads the LUME data.
needs_lume = pytest.mark.usefixtures("lume_dir")


@dataclass(frozen=True)
class Family:
    """A base checkpoint and its fine-tuned variants on disk."""

    spec: CheckpointSpec
    base: Path
    finetuned: list[Path]
    cold: bool = False  # its inputs are evicted from the page cache before each run (test_reliability_crash)

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.finetuned]


@pytest.fixture(scope="session")
def odd_f32_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Llama-shaped float32 family with awkward sizes, 3 shards each, a base and 2 fine-tuned."""
    spec = CheckpointSpec(TINY_ODD, dtype="F32", shards=3, seed=11)
    base, fts = make_family(tmp_path_factory.mktemp("odd_f32"), spec, 2)
    return Family(spec, base, fts)


@pytest.fixture(scope="session")
def odd_bf16_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The same shapes in bfloat16, 2 shards, a base and 3 fine-tuned."""
    spec = CheckpointSpec(TINY_ODD, dtype="BF16", shards=2, seed=12)
    base, fts = make_family(tmp_path_factory.mktemp("odd_bf16"), spec, 3)
    return Family(spec, base, fts)


@pytest.fixture
def make_family_at(tmp_path: Path) -> Callable[..., Family]:
    """Factory: `make_family_at(spec, n_finetuned=2, name="fam")` writes a family under tmp_path."""

    def make(spec: CheckpointSpec, n_finetuned: int = 2, name: str = "fam") -> Family:
        base, fts = make_family(tmp_path / name, spec, n_finetuned)
        return Family(spec, base, fts)

    return make


def umerge_command() -> list[str]:
    """The `umerge` console script of this interpreter's environment (or an equivalent -c line)."""
    script = Path(sys.executable).parent / "umerge"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from umerge.cli import main; main()"]


@dataclass
class Result:
    """Outcome of one CLI run."""

    returncode: int
    stdout: str
    stderr: str


def run_umerge(args: Sequence[str | os.PathLike[str]], cwd: str | os.PathLike[str] | None = None,
               timeout: float = 120, env: dict[str, str] | None = None) -> Result:
    """Run `umerge ARGS...` in a subprocess and capture its output (`env`: extra variables)."""
    env = {**os.environ, **(env or {})}
    env.setdefault("PYTHONPATH", str(REPO / "python"))
    proc = subprocess.run([*umerge_command(), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def umerge_cli() -> Callable[..., Result]:
    """Fixture form of `run_umerge`."""
    return run_umerge


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 and mode of every file under the given directories (to prove inputs are unchanged)."""
    out: dict[str, str] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = f"{digest} {path.stat().st_mode:o}"
    return out


def peer_venv() -> Path | None:
    """The peer venv with mergekit ($UMERGE_PEERS, else <repo>/.venv-peers), or None."""
    root = Path(os.environ.get("UMERGE_PEERS", REPO / ".venv-peers"))
    if (root / "bin" / "mergekit-yaml").exists() and (root / "bin" / "python").exists():
        return root
    return None


@pytest.fixture(scope="session")
def peers() -> Path:
    """Path of the peer venv; skips locally (fails under CI) when mergekit is not installed there.
    Every test that uses it is marked `mergekit` (see `pytest_collection_modifyitems`)."""
    root = peer_venv()
    if root is None:
        where = os.environ.get("UMERGE_PEERS", str(REPO / ".venv-peers"))
        missing_input("parity with mergekit", f"mergekit not found: no {where}/bin/mergekit-yaml "
                                              "(create it with `bash benches/make_peer_venv.sh`)")
    return root


# -- the count of parity tests ---------------------------------------------------------------------

#: Marker -> the peer its tests compare umerge with. `mergekit` is added to every test that uses the
#: `peers` fixture; `peft` is set by the tests that compare with PEFT itself.
PARITY_PEERS = {"mergekit": "mergekit", "peft": "PEFT"}
_parity_tests: dict[str, set[str]] = {m: set() for m in PARITY_PEERS}  # marker -> node ids
_parity_outcomes: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in PARITY_PEERS}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "peers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mergekit)
        for marker, ids in _parity_tests.items():
            if item.get_closest_marker(marker) is not None:  # the marker, not a parameter id that says "peft"
                ids.add(item.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # One outcome per test: its call, or its setup when that did not pass (a skip or a failure).
    if report.when == "call" or (report.when == "setup" and not report.passed):
        for marker, counts in _parity_outcomes.items():
            if report.nodeid in _parity_tests[marker]:
                counts[report.outcome] += 1


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    parts = []
    for marker, peer in PARITY_PEERS.items():
        c = _parity_outcomes[marker]
        parts.append(f"{c['passed'] + c['failed']} against {peer} ({c['passed']} passed, {c['failed']} failed, "
                     f"{c['skipped']} skipped)")
    terminalreporter.write_line("parity tests run: " + "; ".join(parts))

