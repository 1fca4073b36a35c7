"""Matrix products for the engine, with the fastest available backend per device and dtype.

Weights are stored [out, in] (the checkpoint's own layout), so y = x W^T.

On the CPU in fp32 (measured on the 2-core development machine, an AVX-512 AMD EPYC):
- Decoding steps run in NumPy (`RWKVBase.step_numpy`): its BLAS (OpenBLAS in the PyPI wheels)
  streams matrix-vector weights at 23-25 GB/s against 10-16 GB/s for torch's MKL path. Torch's
  own ops next to it (the sampler) run single-threaded (`cpu_forward_threads`): OpenBLAS's
  spinning workers and torch's OpenMP pool fighting over two cores made both 2-4x slower.
- Prompt products go through oneDNN (`torch.ops.mkldnn._linear_pointwise`, in torch's own
  OpenMP pool, so the whole prompt stays in torch with every thread): 190-210 GFLOP/s on the
  prompt shapes against 150-190 for OpenBLAS and 120-190 for MKL, whose dispatch on this AMD CPU
  skips AVX-512. Where oneDNN is missing or fails its first product, NumPy's BLAS forms them
  (torch single-threaded around it), as before.
- Decoding steps of several sequences form their products in oneDNN too (`np_linear`), and bf16
  models hold their product weights prepacked for oneDNN (`PackedWeight`), prompts and steps.
Backends (`RWKV_CPU_MATMUL`): "numpy" (the default, as above), "numpy-blas" (prompts through
NumPy too) and "torch" (plain torch everywhere: the twin the others are tested against).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .errors import notice

try:  # NumPy is optional: without it, torch does everything.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with every torch wheel we support
    _np = None

BACKENDS = ("numpy", "numpy-blas", "torch")
_env_backend = os.environ.get("RWKV_CPU_MATMUL", "numpy")
_backend = "torch" if _np is None else _env_backend if _env_backend in BACKENDS else "numpy"
if _env_backend not in BACKENDS:  # a typo must not pass for a choice
    notice(f"RWKV_CPU_MATMUL={_env_backend!r} is not one of {', '.join(BACKENDS)}; using numpy")


def set_cpu_matmul_backend(name: str) -> None:
    """Choose how CPU fp32 products run (tests compare every choice); see the module docstring."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown CPU matmul backend {name!r} (one of {', '.join(BACKENDS)})")
    _backend = name if _np is not None else "torch"


def cpu_matmul_backend() -> str:
    """The backend in effect: "numpy" falls back to "numpy-blas" where oneDNN cannot be used."""
    if _backend == "numpy" and _onednn_linear() is None:
        return "numpy-blas"
    return _backend


def numpy_decoding() -> bool:
    """Whether fp32 CPU decoding steps run in NumPy (every backend but "torch")."""
    return _backend != "torch"


@functools.cache
def _onednn_linear():
    """oneDNN's fp32 linear op if this torch has it and it agrees with F.linear, else None."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)  # not the global generator: users seed that one
        x, w = torch.randn(8, 32, generator=gen), torch.randn(16, 32, generator=gen)
        if not torch.allclose(op(x, w, None, "none", [], ""), F.linear(x, w), rtol=1e-4, atol=1e-4):
            return None
        return op
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _prompts_onednn() -> bool:
    return _backend == "numpy" and _onednn_linear() is not None


def _numpy_blas_applies(x: torch.Tensor) -> bool:
    """Products of this input through NumPy's BLAS: fp32 CPU work under "numpy-blas"."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and cpu_matmul_backend() == "numpy-blas"


class PackedWeight:
    """A bf16 product weight [out, in], re-laid out once at load into oneDNN's blocked format
    (`torch.ops.mkldnn._reorder_linear_weight`), for bf16 models on the CPU. Products then skip
    the per-call reordering that plain bf16 weights go through. Measured on the development VM
    (AVX512-BF16 EPYC, 2 threads, weights out of cache): one token streams 20-36 GB/s of weights
    against 13.5 for torch's plain bf16 products, so bf16 decoding reads half of fp32's bytes at
    about fp32's rate; 256-token prompt products run at 430-455 GFLOP/s against 370-420. The
    blocked tensor can only be multiplied (`linear`, `np_linear`), so only weights used for
    nothing else are packed (`RWKVBase.packed_products`)."""

    def __init__(self, w: torch.Tensor):
        self.shape, self.dtype = tuple(w.shape), w.dtype
        self.nbytes = w.numel() * w.element_size()
        # the batch-size hint only picks the blocking; measured equal for 1 and 256 rows
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 256)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, in] (any float dtype, rounded to bf16) -> [M, out] bf16."""
        return torch.ops.mkldnn._linear_pointwise(x2.to(self.dtype), self.blocked, None, "none", [], "")


def packs_bf16_weights() -> bool:
    """Whether bf16 models loaded for the CPU now get `PackedWeight`s: not under the "torch"
    backend (the twin), and only where oneDNN packs and multiplies a bf16 weight correctly here
    (CPUs without bf16 support may refuse)."""
    return _backend != "torch" and _bf16_packing_works()


@functools.cache
def _bf16_packing_works() -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(4, 64, generator=gen).bfloat16(), torch.randn(32, 64, generator=gen).bfloat16()
        want = F.linear(x.float(), w.float())
        return torch.allclose(PackedWeight(w)(x).float(), want, rtol=2e-2, atol=2e-2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def np_linear(x, w):
    """The NumPy decoding step's products: x [..., in] fp32 ndarray @ w^T -> [..., out] fp32, with
    w an fp32 ndarray [out, in] or a `PackedWeight` (x rounded to bf16, sums in fp32).

    One sequence's row goes through NumPy's BLAS (a matrix-vector product at ~25 GB/s). Several
    sequences' rows go through oneDNN where prompts do: OpenBLAS's sgemm repacks the weight on
    every call and streams it at 8-10 GB/s for 2-16 rows here, oneDNN at 11-16 (on both threads:
    `cpu_forward_threads` leaves such steps multi-threaded)."""
    if isinstance(w, PackedWeight):  # ~170 calls a step at 0.1B: straight to oneDNN, not via `linear`
        x2 = torch.from_numpy(_np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
        return w(x2).float().numpy().reshape(*x.shape[:-1], w.shape[0])
    if x.size == x.shape[-1] or not _prompts_onednn():
        return x @ w.T
    return linear(torch.from_numpy(_np.ascontiguousarray(x)), torch.from_numpy(w)).numpy()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T -> [..., out], in x's dtype (bf16 for a `PackedWeight`)."""
    if isinstance(w, PackedWeight):
        x2 = x.reshape(-1, x.shape[-1])
        return w(x2 if x2.is_contiguous() else x2.contiguous()).view(*x.shape[:-1], w.shape[0])
    if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and _backend != "torch":
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if _prompts_onednn() and x2.shape[0] > 1 and w.is_contiguous():
            return _onednn_linear()(x2, w, None, "none", [], "").view(*x.shape[:-1], w.shape[0])
        # one row (a prompt's head product): a matrix-vector product, where OpenBLAS streams the
        # weights about twice as fast as torch (65536 x 768: 8-9 ms against 17 ms here)
        y = _np.matmul(x2.numpy(), w.numpy().T)
        return torch.from_numpy(y).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b (RWKV-7's per-head chunk products). NumPy's BLAS is ~1.7x faster than
    torch.bmm single-threaded at 64 x 64 x 64; operands are made contiguous first, since NumPy
    loops slowly over transposed stacks."""
    if _numpy_blas_applies(a) and b.dtype == torch.float32:
        return torch.from_numpy(_np.matmul(a.contiguous().numpy(), b.contiguous().numpy()))
    return a @ b


def batched_matvec(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m [..., R, C] @ x [..., C] -> [..., R]. For RWKV-7's per-head state products: NumPy runs
    these 12 x 64 x 64 products in ~4 us against ~43 us for torch.bmm on the CPU."""
    if _numpy_blas_applies(x) and m.dtype == torch.float32:
        return torch.from_numpy(_np.matmul(m.numpy(), x.contiguous().numpy()[..., None])[..., 0])
    return (m @ x.unsqueeze(-1)).squeeze(-1)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (Linux; a no-op elsewhere). By default it serves
    allocations above a dynamic threshold (128 KB to 32 MB) with fresh mappings and returns freed
    heap tops to the OS, so a prompt's temporaries (the six token-shift mixes of a 256-token
    chunk: 4.7 MB, every layer) page-fault on every touch. Below 256 MB from the heap, and up to
    512 MB kept free: v7 0.1B 256-token prefill +6% on average over six alternating processes
    (690-779 -> 778-797 tok/s), v4 neutral. Costs resident memory (freed blocks stay mapped)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 512 << 20))


def cpu_forward_threads(x: torch.Tensor, prompt: bool = False, rows: int = 1):
    """A context that runs torch single-threaded around work next to NumPy BLAS calls: a decoding
    step of one sequence and the sampling right after it, and prompts whose products NumPy forms
    ("numpy-blas"). BLAS workers keep spinning after a call. Prompts and steps of several
    sequences (`rows`) whose products oneDNN forms keep every thread. Elsewhere (a GPU, say) a
    no-op context, cheaply: it sits on every decoding step's path."""
    uses_blas = x.dtype == torch.float32 and x.device.type == "cpu" and numpy_decoding()
    if not uses_blas or ((prompt or rows > 1) and _prompts_onednn()) or torch.get_num_threads() == 1:
        return nullcontext()
    return _single_threaded()


@contextmanager
def _single_threaded():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Like `linear`, but the product is formed and returned in fp32.

    RWKV-4's keys and values feed exponentials, and an fp16 product can overflow before any cast
    (ChatRWKV PR #155), so half-precision inputs are promoted before the product on the CPU. A
    `PackedWeight`'s product is rounded to bf16 first, as the reference's bf16 products are:
    bf16 has fp32's range, so nothing overflows.
    """
    if x.dtype == torch.float32 or isinstance(w, PackedWeight):  # bf16 needs no guard: fp32's range
        return linear(x, w).float()
    if x.device.type == "cuda":  # half inputs, fp32 accumulation and output in one GEMM (torch >= 2.8)
        try:
            x2 = x.reshape(-1, x.shape[-1])
            return torch.mm(x2, w.t(), out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])
        except (TypeError, RuntimeError):
            pass
    return F.linear(x.float(), w.float())


def bmm_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear_fp32_out` for n inputs and weights at once: x [n, R, C], w [n, O, C] -> [n, R, O]
    fp32, one batched GEMM on a GPU (torch >= 2.8), else n products."""
    if x.device.type == "cuda" and x.dtype != torch.float32:
        try:
            return torch.bmm(x, w.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.stack([linear_fp32_out(xi, wi) for xi, wi in zip(x.unbind(0), w.unbind(0), strict=False)])
