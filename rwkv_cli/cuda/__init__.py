"""The GPU engine: fused CUDA kernels compiled at first use with NVRTC, and CUDA-graph decoding.

    loader.py   find kernels/*.cu, compile with NVRTC (cuda-bindings), cache, launch on torch's stream
    kops.py     Python entry points of the kernels (shape checks, grids)
    twins.py    the PyTorch twin of every kernel (test oracles)
    prefill.py  prompt time-mix / channel-mix with the kernels around cuBLAS products
    decode.py   one decoding step from the kernels, on static buffers
    graph.py    that step captured as a CUDA graph per batch size; flat state buffers

Nothing here is imported on the CPU path. `describe_backend()` is what `rwkv env` prints.
"""

from __future__ import annotations


def describe_backend(device=None) -> str:
    """One line: the kernel backend in use on `device` (the current GPU), or why not."""
    import torch

    from . import loader

    if not torch.cuda.is_available():
        return "PyTorch (no CUDA GPU)"
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    K = loader.kernels_for(device)
    if K is None:
        return f"PyTorch ({loader.status()})"
    try:
        from importlib.metadata import version

        bindings = f"cuda-bindings {version('cuda-bindings')}, "
    except Exception:  # noqa: BLE001
        bindings = ""
    pdl = "; programmatic dependent launches" if getattr(K, "dependent_launch", False) else ""
    where = f"{bindings}sm_{K.arch}{pdl}; cache {loader.cache_dir()}"
    return f"fused CUDA kernels (NVRTC {K.nvrtc_version}, {where})"
