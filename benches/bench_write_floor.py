"""Benchmark: the least time any merge of the 1.1B benchmark can take on this machine's disk.

Every merge writes its output and makes it durable before the atomic rename (ARCHITECTURE.md,
"Writing"): for the 1.1B bf16 benchmark that is 2.05 GiB. This times that floor with no merge at
all, from an in-memory buffer, the way `dd bs=16M` would:

- buffered: `write` into the page cache, then `fsync` (what umerge does);
- direct: `O_DIRECT` writes that bypass the page cache, then `fsync` (the fastest durable write
  this disk offers from one thread);
- sha256 of the same bytes (umerge records each shard's digest in the recipe; hashed by a thread
  beside the writes, so it overlaps them, but it is CPU time on a 2-core machine).

Given a peer's wall time (`--peer-seconds`, e.g. mergekit's linear merge from bench_methods.py),
it prints the largest speed-up that floor allows. A benchmark, not a test: nothing here asserts.

    .venv/bin/python benches/bench_write_floor.py --peer-seconds 20.4
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ties import machine  # noqa: E402

#: Bytes of the merged 1.1B bf16 benchmark model (TinyLlama shapes, 22 layers).
OUTPUT_BYTES = 2_200_119_840
BLOCK = 16 * 2**20


def buffer() -> mmap.mmap:
    """A page-aligned 16 MiB buffer of non-zero bytes (O_DIRECT needs the alignment)."""
    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    return buf


def timed_write(path: Path, total: int, direct: bool) -> float:
    buf = buffer()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        written = 0
        while written < total:
            written += os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def timed_sha256(total: int) -> float:
    buf = buffer()
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(total // BLOCK):
        h.update(buf)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("bench-out"), help="where to write (default ./bench-out)")
    p.add_argument("--bytes", type=int, default=OUTPUT_BYTES, help="bytes written (default: the 1.1B output)")
    p.add_argument("--peer-seconds", type=float, default=None, help="a peer's wall time, for the speed-up bound")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    total = (args.bytes + BLOCK - 1) // BLOCK * BLOCK
    target = args.dir / "write-floor.tmp"
    rows = [("write + fsync (page cache)", timed_write(target, total, direct=False))]
    try:
        rows.append(("write + fsync (O_DIRECT)", timed_write(target, total, direct=True)))
    except OSError as e:  # tmpfs and some filesystems refuse O_DIRECT
        print(f"O_DIRECT not available here: {e}")
    rows.append(("sha256 (one thread)", timed_sha256(total)))
    print(f"Machine: {machine()}; {total / 2**30:.2f} GiB to {args.dir.resolve()}")
    print(f"Command: {' '.join(sys.argv)}\n")
    print("| step | seconds |\n|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} |")
    floor = min(s for name, s in rows if name.startswith("write"))
    if args.peer_seconds:
        print(f"\nA merge writing this output durably takes at least {floor:.2f} s here: at most "
              f"{args.peer_seconds / floor:.1f}x faster than a peer taking {args.peer_seconds:.1f} s.")


if __name__ == "__main__":
    main()
