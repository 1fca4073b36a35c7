"""Matrix products for the engine, with the fastest available backend per device and dtype.

Weights are stored [out, in] (the checkpoint's own layout), so y = x W^T.

On the CPU in fp32, products go through NumPy's BLAS (OpenBLAS in the PyPI wheels) when it is
available. Measured on the 2-core development machine: matrix-vector products (decoding) stream
weights at 23-25 GB/s against 10-16 GB/s for torch's MKL path, and a 256-token RWKV-4 prefill
runs 1.4x faster. Torch's own element-wise ops then run single-threaded (`cpu_forward_threads`):
OpenBLAS's spinning workers and torch's OpenMP pool fighting over two cores made both 2-4x
slower. Both paths are tested for the same numbers; `RWKV_CPU_MATMUL=torch` forces torch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

try:  # NumPy is optional: without it, torch does everything.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with every torch wheel we support
    _np = None

_USE_NUMPY = _np is not None and os.environ.get("RWKV_CPU_MATMUL", "numpy") != "torch"


def cpu_matmul_backend() -> str:
    return "numpy" if _USE_NUMPY else "torch"


def set_cpu_matmul_backend(name: str) -> None:
    """Switch between "numpy" and "torch" for CPU fp32 products (tests compare the two)."""
    global _USE_NUMPY
    if name not in ("numpy", "torch"):
        raise ValueError(f"unknown CPU matmul backend {name!r}")
    _USE_NUMPY = name == "numpy" and _np is not None


def _numpy_applies(x: torch.Tensor) -> bool:
    return _USE_NUMPY and x.dtype == torch.float32 and x.device.type == "cpu"


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T -> [..., out], in x's dtype."""
    if _numpy_applies(x) and w.dtype == torch.float32:
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _np.matmul(x2.numpy(), w.numpy().T)
        return torch.from_numpy(y).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b (RWKV-7's per-head chunk products). NumPy's BLAS is ~1.7x faster than
    torch.bmm single-threaded at 64 x 64 x 64; operands are made contiguous first, since NumPy
    loops slowly over transposed stacks."""
    if _numpy_applies(a) and b.dtype == torch.float32:
        return torch.from_numpy(_np.matmul(a.contiguous().numpy(), b.contiguous().numpy()))
    return a @ b


def batched_matvec(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m [..., R, C] @ x [..., C] -> [..., R]. For RWKV-7's per-head state products: NumPy runs
    these 12 x 64 x 64 products in ~4 us against ~43 us for torch.bmm on the CPU."""
    if _numpy_applies(x) and m.dtype == torch.float32:
        return torch.from_numpy(_np.matmul(m.numpy(), x.contiguous().numpy()[..., None])[..., 0])
    return (m @ x.unsqueeze(-1)).squeeze(-1)


@contextmanager
def cpu_forward_threads(x: torch.Tensor):
    """Run torch single-threaded around work next to NumPy BLAS calls (a forward whose products it
    does, the sampling right after it): BLAS workers keep spinning after a call."""
    if not _numpy_applies(x) or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Like `linear`, but the product is formed and returned in fp32.

    RWKV-4's keys and values feed exponentials, and an fp16 product can overflow before any cast
    (ChatRWKV PR #155), so half-precision inputs are promoted before the product on the CPU.
    """
    if x.dtype == torch.float32:
        return linear(x, w)
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
