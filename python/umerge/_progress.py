"""The progress bar shown during merges: a tqdm bar on stderr fed by the engine's callback.

The engine calls `callback(tensors_done, tensors_total, bytes_done, bytes_total)` after each
tensor (from a worker thread, with the GIL taken for the call). The bar counts input bytes, so
its rate and ETA are in bytes per second, and shows tensors done as a postfix.
"""

from __future__ import annotations

import sys
from typing import Any

ProgressFn = Any  # Callable[[int, int, int, int], None]


class ProgressBar:
    """A tqdm bar over input bytes, usable as the engine's progress callback and a context manager."""

    def __init__(self, desc: str = "merging", disable: bool = False) -> None:
        self._bar: Any = None
        self._desc = desc
        self._disable = disable

    def __call__(self, tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int) -> None:
        if self._disable:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=bytes_total,
                desc=self._desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
        self._bar.update(bytes_done - self._bar.n)
        self._bar.set_postfix_str(f"{tensors_done}/{tensors_total} tensors", refresh=False)

    def close(self) -> None:
        """Removes the bar (the CLI prints its own one-line summary afterwards)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
