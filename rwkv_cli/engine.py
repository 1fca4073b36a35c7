"""The engine's Python API: load a checkpoint onto a device and run prompts and steps on it.

    model = load_model("RWKV-x070-World-0.1B.pth", device="cpu", dtype="fp32")
    logits, state = model.forward([[1, 2, 3]])          # prefill, B = 1
    logits, state = model.forward([[int(logits.argmax())]], state)   # one RNN step

The CLI, tests and benchmarks all go through this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .errors import NonFiniteError, RWKVError
from .memory import check_fits, model_label
from .models import model_class
from .ops import cpu_forward_threads, keep_freed_memory
from .state import State

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Prompts are fed in chunks of this many tokens: memory stays bounded for any prompt length.
DEFAULT_PREFILL_CHUNK = 256


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows
        raise RWKVError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RWKVError(f"--device {device} was requested, but no CUDA GPU is available to PyTorch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RWKVError(f"--device {device} was requested, but PyTorch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise RWKVError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise RWKVError(f"unsupported dtype {dtype} (use fp32, bf16 or fp16)")
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise RWKVError(f"unsupported dtype {dtype!r} (use auto, fp32, bf16 or fp16)")
    return DTYPES[dtype]


@dataclass
class Model:
    """A loaded RWKV model: `forward` for prompts and steps, `zero_state` for new sequences."""

    cfg: ModelConfig
    net: object  # the per-version module (models/rwkv4.py, models/rwkv7.py)
    path: Path
    load_seconds: float
    fingerprint: str = ""  # identifies the weights (see `weights_fingerprint`); state files record it
    source: str | None = None  # how the user named the model (a Hub spec), for messages
    spec: str | None = None  # a spec that finds exactly these weights again (state files record it)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def device(self) -> torch.device:
        return self.net.device

    def zero_state(self, batch_size: int = 1) -> State:
        return self.net.zero_state(batch_size)

    def forward(self, tokens, state: State | None = None, full_output: bool = False, check_finite: bool = True):
        """Run B sequences of T tokens: tokens [B, T] (a tensor or nested lists; a flat list is B = 1).

        Returns fp32 logits [B, V] after the last token ([B, T, V] with full_output) and the new
        state. Prompts longer than `prefill_chunk` are processed chunk by chunk, carrying the state.
        Non-finite logits raise NonFiniteError; `check_finite=False` leaves that to the caller (the
        check waits for a GPU to finish, so decoding loops fold it into the sampler's transfer).
        """
        tokens = self._as_batch(tokens, full_output)
        if state is None:
            state = self.zero_state(tokens.shape[0])
        elif state.batch_size != tokens.shape[0]:
            raise ValueError(f"state holds {state.batch_size} sequences but {tokens.shape[0]} were given")
        step = self.prefill_chunk
        if step == DEFAULT_PREFILL_CHUNK and tokens.is_cuda:  # GPU: longer chunks amortise launches
            step = self.net.gpu_prefill_chunk()
        B, T = tokens.shape
        with cpu_forward_threads(self.net.emb, prompt=T > 1, rows=B):  # the finiteness sum too
            if T <= step:  # one chunk (every decoding step): no slicing
                logits, state = self.net.forward(tokens, state, full_output)
            else:
                outs = []
                for t0 in range(0, T, step):
                    logits, state = self.net.forward(tokens[:, t0 : t0 + step], state, full_output)
                    outs.append(logits)
                logits = torch.cat(outs, 1) if full_output else outs[-1]
            logits = logits.float()
            if check_finite and not math.isfinite(float(logits.sum())):  # NaN or inf anywhere shows in the sum
                raise non_finite_error(self.dtype)
        return logits, state

    def step_input(self, batch_size: int) -> torch.Tensor | None:
        """On a GPU, the buffer [B] that a decoding step of B sequences reads its ids from (its
        CUDA graph's input): a sampler that writes its ids there saves a copy per step. None on
        the CPU."""
        return self.net.step_input(batch_size)

    def step(self, tokens: torch.Tensor, state: State):
        """One decoding step for ids [B] that a Sampler drew (in range by construction, possibly
        still being computed on the device): no checks, so nothing waits for the device. Returns
        fp32 logits [B, V], not checked for finiteness (the sampler's read-back does that), and
        the new state."""
        if state.batch_size != tokens.shape[0]:
            raise ValueError(f"state holds {state.batch_size} sequences but {tokens.shape[0]} tokens were given")
        with cpu_forward_threads(self.net.emb, rows=tokens.shape[0]):
            logits, state = self.net.forward(tokens.view(-1, 1), state)
        return logits.float(), state

    def _as_batch(self, tokens, full_output: bool = False) -> torch.Tensor:
        V = self.cfg.vocab_size
        if not isinstance(tokens, torch.Tensor):
            if len(tokens) == 0:
                raise ValueError("no tokens given")
            rows = [tokens] if isinstance(tokens[0], int) else tokens
            # checked here, in Python: a tensor's min/max cost more than a decoding step's work
            if any(len(r) == 0 for r in rows) or not all(0 <= t < V for r in rows for t in r):
                bad = "rows of no tokens" if any(len(r) == 0 for r in rows) else f"token ids outside [0, {V})"
                raise ValueError(f"tokens must be [B, T] with T >= 1 and ids in [0, {V}): got {bad}")
            tokens = torch.tensor(rows, dtype=torch.long)
        else:
            if tokens.dim() == 1:
                tokens = tokens.unsqueeze(0)
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
                raise ValueError(f"token ids must lie in [0, {V})")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [B, T] with T >= 1, got shape {list(tokens.shape)}")
        if tokens.shape[1] == 1 and not full_output and self.device.type == "cuda" and not tokens.is_cuda:
            return tokens  # a decoding step: the CUDA graph copies ids in through pinned memory
        return tokens.to(self.device)


def non_finite_error(dtype: torch.dtype) -> NonFiniteError:
    hint = " (fp16 overflow? try --dtype bf16 or fp32)" if dtype == torch.float16 else ""
    return NonFiniteError(f"the model produced non-finite logits{hint}")


def load_model(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Model:
    """Load a checkpoint (BlinkDL .pth or safetensors) for inference on `device` in `dtype`.

    A model that would not fit in the device's available memory is refused before any weight is
    copied (`memory.check_fits`), except that `dtype="auto"` on the CPU then loads bf16 if that
    fits, and says so on stderr.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu":
        keep_freed_memory()  # before the weights' copies: CPU prompts allocate large temporaries
    cfg, tensors = load_checkpoint(path)
    dt = check_fits(model_label(cfg, tensors), tensors, dev, dt, auto=dtype == "auto")
    net = model_class(cfg.version)(cfg, tensors, dt, dev)
    return Model(cfg, net, Path(path), time.perf_counter() - t0, weights_fingerprint(cfg, tensors))


def weights_fingerprint(cfg: ModelConfig, tensors: dict[str, torch.Tensor], samples: int = 64) -> str:
    """A short hash of the config and of `samples` evenly spaced values of every tensor, in fp32.

    It tells apart any two checkpoints that differ anywhere near those positions (different
    models, fine-tunes, files of the same shape), costs milliseconds instead of hashing gigabytes,
    and does not depend on the run dtype or on .pth versus safetensors.
    """
    import hashlib

    h = hashlib.sha256(repr(sorted(vars(cfg).items())).encode())
    for name in sorted(tensors):
        flat = tensors[name].reshape(-1)
        if flat.numel() == 0:
            continue
        k = min(samples, flat.numel())
        idx = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)  # exact even spacing (integers)
        h.update(name.encode())
        h.update(flat[idx].float().numpy().tobytes())
    return h.hexdigest()[:16]
