"""Crash safety: SIGKILL at many moments, stale temporary directories, disk full, inputs changed
while mapped.

Promises checked (ARCHITECTURE.md, "Writing" and "Errors"; issue 8):

- A merge killed with SIGKILL at any moment leaves the target path either absent or holding the
  complete model (here: byte-identical to an uninterrupted run), never a partial one.
- The temporary directory a killed run leaves beside the target (`.umerge-tmp-<name>-<pid>`) is
  removed by the next merge to that target once its process is gone, and reported; one whose
  process is still alive is left alone.
- Disk full: a clear error, exit 1, and no temporary directory left (a real 2 MiB tmpfs when this
  process may mount one, else the engine's injected write limit `UMERGE_TEST_WRITE_LIMIT`).
- An input shard truncated or rewritten while the merge has it mapped gives an error naming the
  file, never a SIGBUS crash.

The kill test runs twice: on tmpfs (/dev/shm) when there is one, so that timings are CPU-bound and
the kill points spread evenly over the merge; and on disk with every input's pages evicted from
the page cache before each run (posix_fadvise DONTNEED), so the engine reads them around the cache
(O_DIRECT into its buffers) as in a cold-cache merge. The input-change tests run both ways too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Family, run_umerge, umerge_command
from umerge.synthetic import CheckpointSpec, LlamaShape, make_family

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import disk  # noqa: E402  (page-cache residency via mincore, independent of the engine)

#: About 110 M parameters (220 MB per bf16 model): a merge takes about 1 s on one thread here, so
#: the ~0.1 s interpreter start is a small part of it and the kill points land inside the merge.
KILL_SHAPE = LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=8, kv_heads=2, vocab=8000)
KILL_POINTS = 24
#: Kill points run to 95% of the fastest run seen so far. A run that finishes before its kill point
#: is a valid outcome (complete) but tests nothing: the point is retried against the shorter time,
#: up to this many runs in all, so that a machine whose speed varies still gets KILL_POINTS kills.
MAX_RUNS = 2 * KILL_POINTS
REFERENCE_RUNS = 3


def fast_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A fresh directory on tmpfs when there is one (CPU-bound timings), else under pytest's tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = shm / f"umerge-rel-{os.getpid()}-{name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d
    return tmp_path_factory.mktemp(name)


def evict(dirs: list[Path]) -> None:
    """Drop every safetensors file under `dirs` from the page cache (clean pages: fsync first)."""
    files = disk.safetensors_files(dirs)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    assert disk.cached_fraction(files) < 0.05, "the inputs could not be evicted from the page cache"


@pytest.fixture(scope="module", params=["tmpfs", "disk-evicted"])
def kill_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Family]:
    cold = request.param == "disk-evicted"
    root = tmp_path_factory.mktemp("kill-disk") if cold else fast_dir(tmp_path_factory, "kill")
    spec = CheckpointSpec(KILL_SHAPE, dtype="BF16", shards=3, seed=3)
    base, fts = make_family(root / "models", spec, 2)
    yield Family(spec, base, fts, cold=cold)
    if str(root).startswith("/dev/shm"):
        shutil.rmtree(root, ignore_errors=True)


def before_run(fam: Family) -> None:
    if fam.cold:
        evict([fam.base, *fam.finetuned])


def digest_tree(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".umerge"))


def merge_args(fam: Family, out: Path) -> list[str]:
    return ["ties", *map(str, fam.finetuned), "--base", str(fam.base), "--density", "0.8", "-o", str(out),
            "--threads", "1", "--quiet", "--overwrite"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "python"))
    return e


def test_sigkill_at_many_points_never_leaves_a_partial_output(kill_family: Family) -> None:
    root = kill_family.base.parent.parent
    ref = root / "reference"
    timings = []
    for _ in range(REFERENCE_RUNS):
        before_run(kill_family)
        t0 = time.monotonic()
        r = run_umerge(merge_args(kill_family, ref))
        timings.append(time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    t_ref = min(timings)
    expected = digest_tree(ref)
    assert any(name.endswith(".safetensors") for name in expected)
    if kill_family.cold:  # the bytes do not depend on how the inputs were read
        warm = root / "warm-reference"
        assert run_umerge(merge_args(kill_family, warm)).returncode == 0
        assert digest_tree(warm) == expected, "reading around the page cache changed the output"

    out_parent = root / "targets"
    out_parent.mkdir()
    target = out_parent / "merged"
    kills = runs = 0
    while kills < KILL_POINTS and runs < MAX_RUNS:
        runs += 1
        at = t_ref * (0.02 + 0.93 * kills / (KILL_POINTS - 1))
        before_run(kill_family)
        t0 = time.monotonic()
        proc = subprocess.Popen([*umerge_command(), *merge_args(kill_family, target)], env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=at)
            t_ref = min(t_ref, time.monotonic() - t0)  # finished first: aim the next points earlier
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, err.decode()
        # The promise: absent, or complete (the same bytes as the uninterrupted run).
        if target.exists():
            assert digest_tree(target) == expected, f"kill at {at:.2f} s left a partial output"
    assert kills == KILL_POINTS, f"only {kills} of {runs} runs were killed (reference runs: {timings})"
    # A last, uninterrupted run completes and removes every temporary directory the killed runs left.
    r = run_umerge(merge_args(kill_family, target))
    assert r.returncode == 0, r.stderr
    assert digest_tree(target) == expected
    assert leftovers(out_parent) == [], f"stale temporary directories survived the next run: {leftovers(out_parent)}"
    v = run_umerge(["verify", target])
    assert v.returncode == 0, v.stdout + v.stderr


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_directories_are_cleaned_only_when_their_process_is_gone(tmp_path: Path) -> None:
    from umerge.synthetic import TINY_ODD

    base, fts = make_family(tmp_path / "models", CheckpointSpec(TINY_ODD, "F32", shards=2, seed=9), 2)
    parent = tmp_path / "outs"
    parent.mkdir()
    stale = parent / f".umerge-tmp-merged-{dead_pid()}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    alive = parent / f".umerge-tmp-merged-{os.getpid()}"  # this test's own process: alive
    alive.mkdir()
    (alive / "keep").write_text("in use")
    other = parent / f".umerge-tmp-other-{dead_pid()}"  # another target's: not ours to judge
    other.mkdir()
    r = run_umerge(["ties", *fts, "--base", base, "--density", "0.5", "-o", parent / "merged", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert not stale.exists(), "a dead run's temporary directory was not removed"
    assert (alive / "keep").read_text() == "in use", "a live process's temporary directory was touched"
    assert other.exists()
    assert stale.name in r.stderr, f"the removal is not reported: {r.stderr!r}"
    assert alive.name in r.stderr, f"the live one is not reported: {r.stderr!r}"


def _try_mount_tmpfs(d: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
    return r.returncode == 0


def test_disk_full_gives_a_clear_error_and_removes_the_temporary_directory(tmp_path: Path) -> None:
    # ~1.3 M parameters of f32: a 5 MB output, more than the 2 MiB filesystem holds.
    shape = LlamaShape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=2000)
    assert shape.n_params() * 4 > 4 * 2**20
    base, fts = make_family(tmp_path / "models", CheckpointSpec(shape, "F32", shards=2, seed=4), 2)
    small = tmp_path / "small"
    small.mkdir()
    mounted = _try_mount_tmpfs(small, "2m")
    extra_env = {} if mounted else {"UMERGE_TEST_WRITE_LIMIT": str(2 * 2**20)}
    try:
        out = small / "merged"
        r = run_umerge(["ties", *fts, "--base", base, "--density", "0.5", "-o", out, "--quiet"], env=extra_env)
        assert r.returncode == 1, f"exit {r.returncode}: {r.stderr}"
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("umerge: error: "), r.stderr
        assert "No space left on device" in lines[0] or "disk full" in lines[0].lower(), lines[0]
        assert "internal error" not in lines[0], lines[0]
        assert sorted(p.name for p in small.iterdir()) == [], f"left on the full disk: {list(small.iterdir())}"
        # Once there is room, the same merge works.
        r = run_umerge(["ties", *fts, "--base", base, "--density", "0.5", "-o", tmp_path / "roomy", "--quiet"])
        assert r.returncode == 0, r.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)


CHANGE_WHILE_MAPPED = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import umerge
    from umerge.errors import UmergeError
    mode, victim, base, out, *models = sys.argv[1:]
    done = []
    def progress(t, tt, b, bt):
        if done:
            return
        done.append(1)
        p = Path(victim)
        if mode == "truncate":
            os.truncate(p, p.stat().st_size // 2)
        else:  # rewrite in place, same length, new contents
            with open(p, "r+b") as f:
                f.seek(p.stat().st_size // 2)
                f.write(b"\\x7f" * 4096)
    try:
        umerge.ties(models, base=base, density=0.8, out=out, threads=1, progress=progress)
    except UmergeError as e:
        print("ERROR", e)
        sys.exit(3)
    print("OK")
""")


@pytest.mark.parametrize("cache", ["cached", "evicted"])
@pytest.mark.parametrize("mode", ["truncate", "rewrite"])
def test_input_changed_while_mapped_is_an_error_not_a_crash(tmp_path: Path, mode: str, cache: str) -> None:
    shape = LlamaShape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=2000)
    base, fts = make_family(tmp_path / "models", CheckpointSpec(shape, "F32", shards=3, seed=6), 2)
    if cache == "evicted":  # read around the page cache (O_DIRECT), as a cold merge does
        evict([base, *fts])
    victim = fts[1] / "model-00003-of-00003.safetensors"
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-c", CHANGE_WHILE_MAPPED, mode, str(victim), str(base), str(out), *map(str, fts)],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode != -signal.SIGBUS, "SIGBUS: the engine read a truncated mapping"
    assert r.returncode == 3, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "changed while" in r.stdout and victim.name in r.stdout, r.stdout
    assert not out.exists()
    assert leftovers(tmp_path) == []
