"""The training-only dependencies (the `smolvlm[train]` extra), imported on use with an error that names the extra."""

from __future__ import annotations

import importlib

EXTRA = "pip install 'smolvlm[train]'"


def need(module: str, feature: str):
    """`import module`, or an InputError saying which feature needs it and how to install it."""
    from ..errors import InputError

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"{feature} needs the Python package {module.split('.')[0]!r}, which is not installed "
                         f"({e}); install the training extra: {EXTRA}") from e
