"""State files: a conversation (or a read document) saved as its recurrent state, resumable later.

Format: safetensors (no pickle) holding the state tensors under their `State.to_dict()` names,
optionally `logits` (the model's output after the last token, so generation can continue
without re-reading anything), and string metadata:

    "format": "rwkv-cli-state", "format_version": "1",
    "meta": JSON {model: {source, spec, fingerprint, architecture}, tokenizer, tokens, transcript,
                  sampling, created, updated, ...}

Files are written atomically: a temporary file beside the target, fsync, rename, fsync of the
folder. A crash or kill while saving leaves the previous file intact. Loading checks the format,
the model fingerprint and every tensor's name and shape, and reports problems in one line.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RWKVError
from .state import LAYER_STATE, State

FORMAT = "rwkv-cli-state"
FORMAT_VERSION = 1


class StateFileError(RWKVError):
    """A state file that cannot be used: unreadable, corrupted, or made by another model."""


@dataclass
class SavedState:
    state: State
    logits: torch.Tensor | None  # [B, V] fp32: what the model predicts after the saved state
    meta: dict


def model_identity(model) -> dict:
    """What a state file records about the model that made it."""
    cfg = model.cfg
    return {
        "source": str(getattr(model, "source", None) or model.path),
        "spec": getattr(model, "spec", None) or os.path.abspath(model.path),  # what resuming without -m loads
        "fingerprint": model.fingerprint,
        "architecture": {
            "version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "head_size": cfg.head_size, "dim_att": cfg.dim_att, "vocab_size": cfg.vocab_size,
        },
    }


def save_state(path: str | Path, state: State, model, *, logits: torch.Tensor | None = None, **meta) -> Path:
    """Write `state` (and the logits after it) atomically, with `meta` (tokenizer, tokens,
    transcript, sampling, ...) next to the model identity. `created` survives overwrites."""
    from safetensors.torch import save

    path = Path(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta = {"model": model_identity(model), "created": meta.pop("created", None) or now, "updated": now, **meta}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.to_dict().items()}
    if logits is not None:
        tensors["logits"] = logits.detach().float().to("cpu").contiguous()
    data = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)})
    _atomic_write(path, data)
    return path


def _process_gone(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (owned by someone else)
    return False


def _remove_stale_temps(path: Path) -> None:
    """Temp files that earlier saves of `path` left behind when their process was killed mid-write."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and _process_gone(int(pid)):
            tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StateFileError(f"{path}: cannot save the state ({e.strerror or e})") from None
    except BaseException:  # Ctrl-C mid-write: the old file stays, no temp file is left
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # not supported everywhere (e.g. Windows); the data itself is already synced


def read_meta(path: str | Path) -> dict:
    """The metadata of a state file, from its header only (cheap: no tensors are read)."""
    path = Path(path)
    header = _header(path)
    info = header.get("__metadata__") or {}
    if info.get("format") != FORMAT:
        raise StateFileError(f"{path}: not an rwkv-cli state file (no '{FORMAT}' marker)")
    if info.get("format_version") != str(FORMAT_VERSION):
        raise StateFileError(f"{path}: state file format {info.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    try:
        meta = json.loads(info["meta"])
    except (KeyError, json.JSONDecodeError):
        raise StateFileError(f"{path}: the state file's metadata is damaged (invalid JSON)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise StateFileError(f"{path}: the state file's metadata has no model identity")
    meta["_shapes"] = {k: v.get("shape") for k, v in header.items() if k != "__metadata__"}
    return meta


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise StateFileError(f"{path}: empty or truncated state file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise StateFileError(f"{path}: truncated or not a state file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StateFileError(f"{path}: no such state file") from None
    except IsADirectoryError:
        raise StateFileError(f"{path}: is a directory, not a state file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateFileError(f"{path}: not a state file (unreadable header)") from None
    if not isinstance(header, dict):
        raise StateFileError(f"{path}: not a state file")
    return header


def check_compatible(meta: dict, model, path: Path) -> None:
    """Refuse a state made by another model, naming both."""
    saved = meta["model"]
    ours = model_identity(model)
    if saved.get("fingerprint") != ours["fingerprint"]:
        same_shape = saved.get("architecture") == ours["architecture"]
        why = "a different file of the same shape" if same_shape else "a different architecture"
        raise StateFileError(
            f"{path}: this state was made by {saved.get('source')} ({_describe(saved.get('architecture'))}), "
            f"not by the loaded model {ours['source']} ({_describe(ours['architecture'])}): {why}"
        )


def _describe(arch) -> str:
    if not isinstance(arch, dict):
        return "unknown architecture"
    heads = f", {arch.get('n_head')} heads" if arch.get("n_head") else ""
    return f"RWKV-{arch.get('version')}, {arch.get('n_layer')} layers, width {arch.get('n_embd')}{heads}"


def load_state(path: str | Path, model=None) -> SavedState:
    """Read a state file; with `model`, check it was made by that model and move it there."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if model is not None:
        check_compatible(meta, model, path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # truncated data, bad offsets: safetensors raises its own types
        raise StateFileError(f"{path}: damaged state file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    logits = tensors.pop("logits", None)
    version = meta["model"].get("architecture", {}).get("version")
    if version not in LAYER_STATE:
        raise StateFileError(f"{path}: unknown architecture version {version!r} in the state file")
    try:
        state = State.from_dict(tensors, version)
    except ValueError as e:
        raise StateFileError(f"{path}: {e}") from None
    if not all(bool(torch.isfinite(t).all()) for t in state.tensors()):  # on the CPU, before any move
        raise StateFileError(f"{path}: the state holds NaN or infinite values")
    if model is not None:
        expected = State.zeros(model.cfg, state.batch_size).to_dict()
        for name, tensor in state.to_dict().items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise StateFileError(f"{path}: tensor {name} has shape {list(tensor.shape)}, the model needs {list(expected[name].shape)}")
        state = state.to(device=model.device, dtype=model.dtype)
        if logits is not None:
            logits = logits.to(model.device)
    return SavedState(state, logits, meta)


def load_tuned_state(path: str | Path, model) -> State:
    """A BlinkDL state-tuned file (`blocks.N.att.time_state` [H, N, N]) as an initial state.

    Orientation per version (`rwkv-models.md` §12): for RWKV-7 the tensor is used as stored (it is
    already [head, value, key], the inference layout); for RWKV-5.x/6 its last two axes are
    transposed into the [head, key, value] state, as the reference's legacy class and every
    ChatRWKV demo do. The shift vectors start at zero.
    """
    from .checkpoint import read_tensors

    path = Path(path)
    cfg = model.cfg
    if cfg.version not in ("5.0", "5.1", "5.2", "6", "7"):
        raise StateFileError(f"{path}: state-tuned initial states are for RWKV-5, 6 and 7 models, not {cfg.name}")
    tensors = read_tensors(path)
    names = {f"blocks.{i}.att.time_state" for i in range(cfg.n_layer)}
    found = {k for k in tensors if k.endswith(".att.time_state")}
    if found != names:
        raise StateFileError(
            f"{path}: expected time_state tensors for {cfg.n_layer} layers (blocks.N.att.time_state), "
            f"found {len(found)}"
        )
    state = State.zeros(cfg, 1, model.dtype, model.device)
    want = (cfg.n_head, cfg.head_size, cfg.head_size)
    for i, layer in enumerate(state.layers):
        t = tensors[f"blocks.{i}.att.time_state"]
        if tuple(t.shape) != want:
            raise StateFileError(f"{path}: blocks.{i}.att.time_state has shape {list(t.shape)}, the model needs {list(want)}")
        if cfg.version != "7":
            t = t.transpose(1, 2)  # [head, value, key] as stored -> [head, key, value]
        layer.wkv = t.to(device=model.device, dtype=torch.float32).unsqueeze(0).contiguous()
    return state
