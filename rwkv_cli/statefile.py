"""State files: a conversation (or a read document) saved as its recurrent state, resumable later.

Format: safetensors (no pickle) holding the state tensors under their `State.to_dict()` names,
optionally `logits` (the model's output after the last token, so generation can continue
without re-reading anything), and string metadata:

    "format": "rwkv-cli-state", "format_version": "1",
    "meta": JSON {model: {source, spec, fingerprint, architecture}, tokenizer, tokens, transcript,
                  sampling, created, updated, ...}

Files are written atomically: a temporary file beside the target, fsync, rename, fsync of the
folder. A crash or kill while saving leaves the previous file intact. Saving replaces only a state
file of the same family (a chat, or a read prompt / generation), keeps the replaced file's mode,
writes through a symlink, and never creates folders. Loading checks the format, the metadata's
types, the data's extent, the model fingerprint, every tensor's name, shape and values, and
reports problems in one line.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import stat
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
    transcript, sampling, ...) next to the model identity. `created` survives overwrites.
    Refuses (StateFileError) what `check_save_target` refuses."""
    from safetensors.torch import save

    check_save_target(path, meta.get("kind") or "chat")
    path = Path(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta = {"model": model_identity(model), "created": meta.pop("created", None) or now, "updated": now, **meta}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.to_dict().items()}
    if logits is not None:
        tensors["logits"] = logits.detach().float().to("cpu").contiguous()
    data = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)})
    _atomic_write(path, data)
    return path


# "prompt" (rwkv state save) and "generate" (--save-state) both hold a read text: one may replace
# the other. A chat holds a transcript, which neither may replace, nor may a chat replace them.
_FAMILY = {"prompt": "text", "generate": "text"}
_KIND_WORDS = {"chat": "a saved chat", "prompt": "a read prompt", "generate": "a generation's state"}


def kind_words(kind: str) -> str:
    return _KIND_WORDS.get(kind, f"a state of kind {kind!r}")


def check_save_target(path: str | Path, kind: str) -> None:
    """Raise StateFileError unless saving a state of `kind` to `path` loses nothing: `path` is new
    (in an existing folder) or a state file of the same family. Symlinks are followed."""
    if not str(path):  # Path("") would silently become "."
        raise StateFileError("no file name given to save the state to")
    path = Path(path)
    target = _write_target(path)
    try:
        info = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        _check_folder(path, target.parent)
        return
    except OSError as e:
        raise StateFileError(f"{path}: cannot save the state there ({e.strerror or e})") from None
    another = "save the state to another file"
    if stat.S_ISDIR(info.st_mode):
        raise StateFileError(f"{path}: is a folder; give a file name to save the state to")
    if not stat.S_ISREG(info.st_mode):
        raise StateFileError(f"{path}: is a {_special_kind(info.st_mode)}, not a regular file; "
                             f"not replacing it: {another}")
    try:
        existing = read_meta(target).get("kind") or "chat"  # files from before `kind` were chats
    except StateFileError as e:  # not a state file, or one this version cannot read: keep it
        why = str(e).removeprefix(f"{target}: ")
        raise StateFileError(f"{path}: exists and is not an rwkv-cli state file this version can replace "
                             f"({why}); not replacing it: {another}") from None
    if _FAMILY.get(existing, existing) != _FAMILY.get(kind, kind):
        raise StateFileError(f"{path}: holds {kind_words(existing)}; not replacing it with "
                             f"{kind_words(kind)}: {another}")


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _check_folder(path: Path, folder: Path) -> None:
    """Saving never creates folders: a mistyped path should fail, not scatter new folders."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        raise StateFileError(f"{path}: cannot save the state there: folder {folder} does not exist") from None
    except NotADirectoryError:
        raise StateFileError(f"{path}: cannot save the state there: {folder} is not a folder") from None
    except OSError as e:
        raise StateFileError(f"{path}: cannot save the state there ({folder}: {e.strerror or e})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateFileError(f"{path}: cannot save the state there: {folder} is a file, not a folder")


def _write_target(path: Path) -> Path:
    """The file a save of `path` replaces: a symlink's target, so that the link stays a link."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


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
    target = _write_target(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        try:
            old = os.stat(target)
        except FileNotFoundError:
            old = None
        with contextlib.suppress(OSError):  # leftovers are only tidied up
            _remove_stale_temps(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask gives a new file's mode
        try:
            if old is not None:  # keep the replaced file's owner and mode: a private transcript stays private
                new = os.fstat(fd)
                if hasattr(os, "fchown") and (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
                    with contextlib.suppress(OSError):  # only root may give a file away
                        os.fchown(fd, old.st_uid, old.st_gid)
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)  # atomic on POSIX and Windows: readers see the old file or the new
    except OSError as e:
        _discard(tmp)
        raise StateFileError(f"{path}: cannot save the state ({e.strerror or e})") from None
    except BaseException:  # Ctrl-C mid-write: the old file stays, no temp file is left
        _discard(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # not supported everywhere (e.g. Windows); the data itself is already synced


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. the folder is gone: there is nothing to remove
        tmp.unlink(missing_ok=True)


def read_meta(path: str | Path) -> dict:
    """The metadata of a state file, from its header only (cheap: no tensors are read), after
    checking the metadata's types and that the file holds all the data the header declares."""
    path = Path(path)
    header, data_bytes = _header(path)
    info = header.get("__metadata__") or {}
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise StateFileError(f"{path}: not an rwkv-cli state file (no '{FORMAT}' marker)")
    if info.get("format_version") != str(FORMAT_VERSION):
        raise StateFileError(f"{path}: state file format {info.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    try:
        meta = json.loads(info["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise StateFileError(f"{path}: the state file's metadata is damaged (invalid JSON)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise StateFileError(f"{path}: the state file's metadata has no model identity")
    problem = _meta_problem(meta)
    if problem:
        raise StateFileError(f"{path}: damaged: {problem}")
    shapes = _check_data(path, header, data_bytes)
    meta["_shapes"] = shapes
    return meta


_MAX_HEADER = 100_000_000  # safetensors' own limit: a larger "length" is not a state file
# Bytes per element of the safetensors dtypes.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header, and how many bytes of tensor data follow it."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise StateFileError(f"{path}: is a directory, not a state file")
        if not stat.S_ISREG(info.st_mode):  # a fifo or a device would block or never end
            raise StateFileError(f"{path}: is a {_special_kind(info.st_mode)}, not a state file")
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 8:
                raise StateFileError(f"{path}: empty or truncated state file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise StateFileError(f"{path}: truncated or not a state file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StateFileError(f"{path}: no such state file") from None
    except IsADirectoryError:
        raise StateFileError(f"{path}: is a directory, not a state file") from None
    except OSError as e:
        raise StateFileError(f"{path}: cannot read the state file ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateFileError(f"{path}: not a state file (unreadable header)") from None
    if not isinstance(header, dict):
        raise StateFileError(f"{path}: not a state file")
    return header, size - 8 - n


def _check_data(path: Path, header: dict, data_bytes: int) -> dict:
    """{name: shape} of the header's tensors, after checking each entry agrees with itself and
    that the file is long enough for every declared data range (a cut file fails here, cheaply)."""
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        valid = _is_counts(shape) and _is_counts(offsets) and len(offsets) == 2
        if not valid or entry.get("dtype") not in _DTYPE_BYTES:
            raise StateFileError(f"{path}: damaged: the header entry of tensor {name} is invalid")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
            raise StateFileError(f"{path}: damaged: the data range of tensor {name} does not fit its shape")
        shapes[name], end = shape, max(end, offsets[1])
    if end > data_bytes:
        raise StateFileError(f"{path}: damaged: truncated (the header declares {end:,} bytes of tensor data, "
                             f"the file holds {data_bytes:,})")
    return shapes


def _is_counts(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


_TEXT_FIELDS = ("kind", "tokenizer", "system", "text", "created", "updated")
_EXCHANGE = ("user", "assistant")
_SAMPLING_NUMBERS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "penalty_decay")


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the types of a state file's metadata (None: nothing), so that a
    hand-edited file fails here, in one line, not later in `state show`, chat or /load."""
    model = meta["model"]
    arch = model.get("architecture")
    if arch is not None and not isinstance(arch, dict):
        return "the model's architecture is not an object"
    if isinstance(arch, dict) and not isinstance(arch.get("version"), str | None):
        return "the model's architecture version is not text"
    for key in ("source", "spec", "fingerprint"):
        if not isinstance(model.get(key), str | None):
            return f"the model's {key!r} is not text"
    for key in _TEXT_FIELDS:
        if not isinstance(meta.get(key), str | None):
            return f"{key!r} is {_json_type(meta[key])}, not text"
    tokens = meta.get("tokens")
    if tokens is not None and not (type(tokens) is int and tokens >= 0):
        return f"'tokens' is {_json_type(tokens)}, not a count"
    for key in ("think", "raw"):
        if not isinstance(meta.get(key), bool | None):
            return f"{key!r} is {_json_type(meta[key])}, not true or false"
    transcript = meta.get("transcript")
    if transcript is not None and not isinstance(transcript, list):
        return f"'transcript' is {_json_type(transcript)}, not a list of exchanges"
    for i, exchange in enumerate(transcript or []):
        texts = isinstance(exchange, dict) and all(isinstance(exchange.get(k, ""), str) for k in _EXCHANGE)
        if not texts or not isinstance(exchange.get("interrupted", False), bool):
            return f"transcript entry {i + 1} is not an object with 'user' and 'assistant' texts"
    return _sampling_problem(meta.get("sampling"))


def _sampling_problem(sampling) -> str | None:
    from .sampling import SamplingParams

    if sampling is None:
        return None
    if not isinstance(sampling, dict):
        return f"'sampling' is {_json_type(sampling)}, not an object"
    numbers = {k: sampling[k] for k in _SAMPLING_NUMBERS if sampling.get(k) is not None}
    try:  # SamplingParams' own checks: types, finite values, ranges
        SamplingParams().with_overrides(**numbers)
    except ValueError as e:
        return f"sampling: {e}"
    return None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value[:20]!r}"
    return "a list" if isinstance(value, list) else "an object"


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
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StateFileError(f"{path}: damaged: {why}") from None
    logits = tensors.pop("logits", None)
    for name in tensors:  # State.from_dict reads the layer index from the name (and sizes by it)
        found = re.fullmatch(r"blocks\.([0-9]+)\.[a-z_]+", name)
        if found is None or int(found[1]) >= len(tensors):
            raise StateFileError(f"{path}: damaged: unexpected tensor {name}")
    arch = meta["model"].get("architecture") or {}
    version = arch.get("version")
    if version not in LAYER_STATE:
        raise StateFileError(f"{path}: unknown architecture version {version!r} in the state file")
    try:
        state = State.from_dict(tensors, version)
    except ValueError as e:
        raise StateFileError(f"{path}: {e}") from None
    _check_tensors(path, state, logits, model.cfg.vocab_size if model is not None else arch.get("vocab_size"))
    if model is not None:
        expected = State.zeros(model.cfg, state.batch_size).to_dict()
        for name, tensor in state.to_dict().items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise StateFileError(f"{path}: tensor {name} has shape {list(tensor.shape)}, the model needs {list(expected[name].shape)}")
        state = state.to(device=model.device, dtype=model.dtype)
        if logits is not None:
            logits = logits.to(model.device)
    return SavedState(state, logits, meta)


def _check_tensors(path: Path, state: State, logits: torch.Tensor | None, vocab_size) -> None:
    """One sequence, floating point, finite (checked on the CPU, before any move): values a
    damaged file would otherwise carry into the model, where they look like the model's fault."""
    named = {**state.to_dict(), **({"logits": logits} if logits is not None else {})}
    for name, t in named.items():
        if not t.is_floating_point() or t.dim() < 2:
            raise StateFileError(f"{path}: damaged: tensor {name} is {t.dim()}-dimensional {t.dtype}, "
                                 "not a batch of floating-point values")
    batch = {t.shape[0] for t in named.values()}
    if batch != {1}:
        what = f"{batch.pop()} sequences" if len(batch) == 1 else "tensors of different batch sizes"
        raise StateFileError(f"{path}: damaged: it holds {what}; a state file holds one sequence")
    known = type(vocab_size) is int
    if logits is not None and (logits.dim() != 2 or (known and logits.shape[1] != vocab_size)):
        raise StateFileError(f"{path}: damaged: the logits have shape {list(logits.shape)}, "
                             f"not [1, {vocab_size if known else 'vocabulary size'}]")
    for name, t in named.items():
        if not bool(torch.isfinite(t).all()):
            raise StateFileError(f"{path}: damaged: tensor {name} holds NaN or infinite values")


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
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):  # else the model would be blamed
            raise StateFileError(f"{path}: damaged: blocks.{i}.att.time_state holds NaN, infinite "
                                 "or non-float values")
        if cfg.version != "7":
            t = t.transpose(1, 2)  # [head, value, key] as stored -> [head, key, value]
        layer.wkv = t.to(device=model.device, dtype=torch.float32).unsqueeze(0).contiguous()
    return state
