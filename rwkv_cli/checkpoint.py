"""Reading checkpoint files: BlinkDL `.pth` pickles and safetensors, in any known naming layout.

Files are opened lazily (mmap) and never unpickled with full pickle: `.pth` files go through
`torch.load(weights_only=True)`, which refuses any pickle that tries to build arbitrary objects.
The format is sniffed from the first bytes, not the file name, so a renamed or wrong file gets an
error that says what it actually is.

A checkpoint may also be a Hugging Face model folder (`model.safetensors`, `pytorch_model.bin`, or
shards listed by `model.safetensors.index.json`) or such an index file. Tensor names in other
layouts (transformers, fla-hub, prefixed) are mapped to BlinkDL names by `rwkv_cli.layouts`
before detection, so every layout loads directly.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ModelConfig, infer_config, validate
from .errors import CheckpointError

if TYPE_CHECKING:  # torch is imported only where tensors are read, so headers stay cheap
    import torch

_ZIP = b"PK\x03\x04"
_PICKLE = 0x80  # pickle protocol opcode: a legacy (non-zip) torch.save file


def sniff_format(path: Path) -> str:
    """'pth-zip', 'pth-legacy' or 'safetensors'; raises CheckpointError for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = path.stat().st_size
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if head.startswith(_ZIP):
        return "pth-zip"
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path}: a Git LFS pointer, not the weights (the LFS object was never downloaded)"
        )
    if head.startswith(b"GGUF"):
        raise CheckpointError(f"{path}: a llama.cpp GGUF file, which rwkv-cli does not read; use the .pth file")
    if head[:4] in (b"ggmf", b"fmgg", b"ggml", b"lmgg"):
        raise CheckpointError(f"{path}: an rwkv.cpp/ggml file, which rwkv-cli does not read; use the .pth file")
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + n <= size:
            return "safetensors"
        if head[8:9] == b"{":
            raise CheckpointError(f"{path}: truncated safetensors file (header runs past the end)")
    if head[0] == _PICKLE:
        return "pth-legacy"
    raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch .pth nor a safetensors file)")


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without loading any data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    _refuse_state_file(path, header.get("__metadata__"))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _refuse_state_file(path: Path, metadata: dict | None) -> None:
    """Our own state files are safetensors too: name the mix-up instead of a missing emb.weight."""
    if (metadata or {}).get("format") == "rwkv-cli-state":
        raise CheckpointError(f"{path}: an rwkv-cli state file, not a model checkpoint (use it with --state)")


HF_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


def weight_files(path: str | Path) -> list[Path]:
    """The file(s) holding a checkpoint's tensors: the file itself, the shards a `*.index.json`
    lists, or for a directory (a Hugging Face snapshot) its weights file or only checkpoint."""
    path = Path(path)
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return weight_files(path / name)
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".pth", ".safetensors"))
        if len(found) == 1:
            return found
        if not found:
            raise CheckpointError(
                f"{path}: is a directory without a checkpoint (no model.safetensors, pytorch_model.bin, "
                ".pth or .safetensors file)"
            )
        raise CheckpointError(f"{path}: directory holds {len(found)} checkpoints; name one of them")
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path}: not a shard index (no weight_map)") from None
        if not shards:
            raise CheckpointError(f"{path}: the shard index lists no files")
        return [path.parent / s for s in shards]
    return [path]


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a checkpoint under BlinkDL names: from the headers alone for safetensors
    (no torch import)."""
    from .layouts import canonical_shapes

    shapes = {}
    for file in weight_files(path):
        if sniff_format(file) == "safetensors":
            shapes.update(read_safetensors_shapes(file))
        else:
            shapes.update({k: tuple(v.shape) for k, v in _read_file(file).items()})
    return canonical_shapes(shapes)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (a file, a shard index or a model folder), memory-mapped where
    the format allows it, under the file's own names."""
    tensors = {}
    for file in weight_files(path):
        tensors.update(_read_file(file))
    return tensors


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    import torch

    fmt = sniff_format(path)
    if fmt == "safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # its notes on pickle protocols would precede our one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "pth-zip")
    except Exception as e:  # torch raises several types; turn each into one clear line
        raise CheckpointError(f"{path}: {_explain_torch_load_error(e)}") from None
    if isinstance(obj, dict) and set(obj) <= {"state_dict", "model", "module"} and len(obj) == 1:
        obj = next(iter(obj.values()))  # a training wrapper around the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of named tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    markers = {k: v for k, v in obj.items() if k in ("_strategy", "_version", "_rescale_layer")}
    if not tensors and not markers:
        raise CheckpointError(f"{path}: holds no tensors")
    for k in markers:  # keep pre-conversion markers so detection can name them
        tensors.setdefault(k, torch.empty(0))
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None
    _refuse_state_file(path, metadata)
    return tensors


def _explain_torch_load_error(e: Exception) -> str:
    text = _first_line(e)
    if "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError":
        return (
            "refused to unpickle: the file holds objects other than tensors (weights_only=True), "
            "so it is not a plain checkpoint and may run code if loaded unsafely"
        )
    if "central directory" in text or "zip archive" in text or "EOF" in text or "truncated" in text.lower():
        return "truncated or corrupted file (the archive cannot be read to the end)"
    return f"cannot be read as a PyTorch checkpoint ({text})"


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint, map its tensor names to BlinkDL's (any layout of `rwkv_cli.layouts`),
    detect its architecture and check every tensor against the config."""
    from .layouts import canonical_tensors

    path = Path(path)
    try:
        _, tensors = canonical_tensors(read_tensors(path))
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        cfg = infer_config(shapes)
        validate(shapes, cfg)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    return cfg, tensors
