"""umerge: Rust-accelerated, out-of-core model merging, and unlearning via model merging.

The merge engine is the native module `umerge._core`; this package adds the typed Python API,
the CLI (`umerge --help`), and, with the `train` extra, the unlearning workbench.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("umerge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from umerge.errors import InputError, UmergeError

__all__ = ["__version__", "InputError", "UmergeError"]
