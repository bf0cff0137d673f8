"""The disk's own floor for a merge, and control of the page cache, for the cold-cache benchmarks.

A merge must read every input byte it uses and write its output durably. The fastest this disk
does either is measured here with `O_DIRECT` (the page cache bypassed, 16 MiB aligned requests,
one thread), in the same run as the tools it is compared with:

- `direct_read_seconds(files)`: reads every byte of the files;
- `direct_write_seconds(dir, n)`: writes n bytes and fsyncs (the durable-write floor);
- the disk floor of a cold merge is their sum (reads and writes are not overlapped: a lower
  bound only if the disk cannot do both at once, which is what these single-queue virtual disks
  measure; say so when quoting it).

`drop_page_cache()` empties the page cache (root only: `sync` then `/proc/sys/vm/drop_caches`).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterable
from pathlib import Path

BLOCK = 16 * 2**20


def can_drop_page_cache() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_page_cache() -> bool:
    """Write back and drop the page cache (clean pages, dentries, inodes); False without root."""
    if not can_drop_page_cache():
        return False
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    return True


def aligned_buffer(fill: bool) -> mmap.mmap:
    """A page-aligned 16 MiB buffer (O_DIRECT needs the alignment); random bytes when `fill`."""
    buf = mmap.mmap(-1, BLOCK)
    if fill:
        buf.write(os.urandom(BLOCK))
    return buf


def direct_read_seconds(files: Iterable[Path]) -> tuple[float, int]:
    """Seconds to read every byte of `files` with O_DIRECT, and the bytes read."""
    buf = aligned_buffer(fill=False)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def direct_write_seconds(directory: Path, nbytes: int, direct: bool = True) -> float:
    """Seconds to write `nbytes` (rounded up to 16 MiB) to a scratch file in `directory` and
    fsync it, with O_DIRECT (default) or through the page cache; the file is removed."""
    buf = aligned_buffer(fill=True)
    total = (nbytes + BLOCK - 1) // BLOCK * BLOCK
    path = directory / ".disk-floor.tmp"
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
        path.unlink(missing_ok=True)
    return seconds


def safetensors_files(dirs: Iterable[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(Path(d).glob("*.safetensors"))]


def cached_fraction(files: Iterable[Path]) -> float:
    """Fraction of the files' pages resident in the page cache (mincore through a mapping)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    resident = pages = 0
    for f in files:
        size = f.stat().st_size
        if size == 0:
            continue
        # A private (copy-on-write) map, so ctypes can take its address; never written.
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as m:
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            anchor = ctypes.c_char.from_buffer(m)
            ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
            del anchor
            if ok:
                resident += n - bytes(vec).count(0)  # bit 0 set: resident (other bits are reserved, 0)
                pages += n
    return resident / pages if pages else 0.0
