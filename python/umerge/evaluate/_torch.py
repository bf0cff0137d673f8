"""Lazy import of the `train` extra (torch, transformers), with one clear error when it is missing."""

from __future__ import annotations

from types import ModuleType

from umerge.errors import InputError


def require_torch() -> ModuleType:
    """Import and return torch, or raise InputError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise InputError(
            'evaluating a model needs torch and transformers: pip install "umerge[train]" '
            "(scoring saved generations with --score-only does not)"
        ) from exc
    return torch


def require_transformers() -> ModuleType:
    """Import and return transformers, or raise InputError saying how to install it."""
    require_torch()
    try:
        import transformers
    except ImportError as exc:
        raise InputError('evaluating a model needs transformers: pip install "umerge[train]"') from exc
    return transformers
