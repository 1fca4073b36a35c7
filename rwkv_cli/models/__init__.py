"""One module per RWKV version; `model_class(version)` picks the class."""

from __future__ import annotations


def model_class(version: str):
    if version == "4":
        from .rwkv4 import RWKV4

        return RWKV4
    if version in ("5.0", "5.1", "5.2"):
        from .rwkv5 import RWKV5

        return RWKV5
    if version == "6":
        from .rwkv6 import RWKV6

        return RWKV6
    if version == "7":
        from .rwkv7 import RWKV7

        return RWKV7
    raise ValueError(f"no model class for RWKV version {version!r}")
