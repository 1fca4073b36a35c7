"""One module per RWKV version; `model_class(version)` picks the class."""

from __future__ import annotations


def model_class(version: str):
    if version == "4":
        from .rwkv4 import RWKV4

        return RWKV4
    if version == "7":
        from .rwkv7 import RWKV7

        return RWKV7
    raise ValueError(f"no model class for RWKV version {version!r}")
