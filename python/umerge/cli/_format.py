"""Text formatting shared by the CLI's report commands (`inspect`, `verify`)."""

from __future__ import annotations


def human_size(n: int) -> str:
    """A byte count in decimal units with two decimals (``1.50 GB``, ``12.00 kB``), or ``n B`` below 1 kB."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"
