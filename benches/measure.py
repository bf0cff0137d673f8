"""Run one command in a fresh child process and measure its wall time and peak resident memory.

Peak RSS is the kernel's own high-water mark (`ru_maxrss`), so nothing is missed between samples.
One subtlety decides how it is read: a child's `ru_maxrss` starts from the memory of the process
that forked it (Linux carries the pre-exec high-water mark across `exec`), so a command spawned
directly from this benchmark would report at least the benchmark's own size. The command is
therefore started by a tiny intermediate Python (`_RUNNER`, about 10 MB), which runs it, waits, and
reports `getrusage(RUSAGE_CHILDREN)`: the peak of that one child.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    """Outcome of one measured run."""

    command: list[str]
    seconds: float
    cpu_seconds: float  # user + system time of the child: less sensitive than wall time to other load
    peak_rss_bytes: int
    returncode: int
    stderr_tail: str
    read_bytes: int = 0  # bytes the child made the kernel fetch from storage (/proc/<pid>/io read_bytes)
    write_bytes: int = 0  # bytes it sent to storage (write_bytes of /proc/<pid>/io)

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / 2**20


# argv: RESULT_FILE CMD...; runs CMD, then writes "returncode maxrss_kib user_s sys_s read_bytes
# write_bytes" to RESULT_FILE. A reaped child's I/O counters are added to its parent's
# /proc/self/io (as rusage is), so the runner's own counters before and after give the child's.
_RUNNER = (
    "import os, resource, sys\n"
    "def io():\n"
    "    d = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
    "    return int(d['read_bytes']), int(d['write_bytes'])\n"
    "r0, w0 = io()\n"
    "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
    "status = os.waitpid(pid, 0)[1]\n"
    "r1, w1 = io()\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {u.ru_maxrss} {u.ru_utime} {u.ru_stime} '\n"
    "                             f'{r1 - r0} {w1 - w0}')\n"
)


def run_measured(command: Sequence[str | os.PathLike[str]], env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> Measurement:
    """Run `command` (stdout discarded, stderr kept to a temp file) and measure it."""
    cmd = [str(c) for c in command]
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rusage"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _RUNNER, str(result), *cmd], stdout=subprocess.DEVNULL,
                              stderr=err, env=dict(env) if env else None, cwd=cwd, check=False)
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read()[-4000:].decode(errors="replace")
        if not result.exists():
            return Measurement(cmd, seconds, 0.0, 0, proc.returncode or 1, tail)
        rc, maxrss, user, system, read, written = result.read_text().split()
    return Measurement(cmd, seconds, float(user) + float(system), int(maxrss) * 1024, int(rc), tail, int(read),
                       int(written))


def warm_page_cache(paths: Sequence[Path], block: int = 1 << 24) -> int:
    """Read every safetensors file under `paths` once so both tools start from a warm page cache.

    Returns the bytes read. Without this, whichever tool runs first pays for the disk reads.
    """
    total = 0
    for root in paths:
        for f in sorted(Path(root).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(block):
                    total += len(chunk)
    return total
