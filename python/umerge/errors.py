"""Exceptions shared by the whole package.

`InputError` means the user's input or options are wrong (the CLI exits 2); anything else is a bug or
an environment failure (exit 1). The native engine raises `umerge._core.InputError`, which is this
same class re-exported, so callers catch one type whatever layer failed.
"""

from __future__ import annotations

try:  # the native module defines the canonical classes so Rust errors map onto them
    from umerge._core import InputError, UmergeError  # type: ignore[attr-defined]
except ImportError:  # pure-Python use (docs builds, partial installs)

    class UmergeError(Exception):  # type: ignore[no-redef]
        """Base class of every error umerge raises on purpose."""

    class InputError(UmergeError, ValueError):  # type: ignore[no-redef]
        """Bad input or options: a message saying what is wrong and where."""


__all__ = ["UmergeError", "InputError"]
