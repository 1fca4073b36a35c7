"""Will the model fit? Its weights in the run dtype against the memory the device has free,
checked before any weight is copied.

Without this check a model too large for the machine fails late and badly. On Linux the CPU
copies succeed (memory is overcommitted) until the kernel's OOM killer ends the process with
no message; on a GPU torch raises halfway through the load. The figures are estimates, and
swap may make a tight fit worth trying: `RWKV_CLI_SKIP_MEMORY_CHECK=1` turns the check off.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import RWKVError, notice

SKIP_ENV = "RWKV_CLI_SKIP_MEMORY_CHECK"
GIB = 1 << 30
MIB = 1 << 20


def weights_bytes(tensors: dict, dtype) -> int:
    """Bytes of a model's weights in `dtype`: every checkpoint tensor at that element size (the
    few vectors kept in fp32 whatever the dtype, decays and norms, are too small to count)."""
    return sum(t.numel() for t in tensors.values()) * dtype.itemsize


def required_bytes(weights: int, device_type: str) -> int:
    """Memory a loaded model needs to run: its weights, plus 512 MiB and a share of the weights
    for a prompt's temporaries, states, logits and the allocators' caches. A GPU: 10% (a prompt
    chunk's temporaries are sized to 7% of the weights, `RWKVBase.gpu_prefill_chunk`, and cuBLAS
    and the CUDA graphs hold workspaces). The CPU: 3% (a 256-token chunk's temporaries are tens
    of MB; `ops.keep_freed_memory` keeps up to 512 MB of freed blocks)."""
    return weights + weights // (10 if device_type == "cuda" else 32) + 512 * MIB


def available_bytes(device) -> int | None:
    """Memory a new allocation can get now, or None where that is unknown.

    A GPU: its free memory, plus what torch's caching allocator holds unused in this process.
    The CPU: Linux's MemAvailable (free memory plus page cache the kernel can drop, such as a
    checkpoint's own mapped pages), or less where this process's cgroup (a container's limit)
    leaves less.
    """
    if device.type == "cuda":
        import torch

        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    candidates = [n for n in (_meminfo_available(), cgroup_room()) if n is not None]
    return min(candidates) if candidates else None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit: limit - (usage - inactive file pages),
    the working set that container runtimes compare with the limit. None without a limit.

    cgroup v2 ("0::/path": memory.max, memory.current) and v1 (the "memory" controller's
    memory.limit_in_bytes, memory.usage_in_bytes); inside a container the path read from
    /proc/self/cgroup may not exist under `root`, whose top files are then the container's own.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            files, base = ("memory.max", "memory.current", "inactive_file"), root
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = root / "memory"
        else:
            continue
        own = base / path.lstrip("/")
        room = _room_in(own if (own / files[0]).exists() else base, *files)
        if room is not None:
            rooms.append(room)
    return min(rooms) if rooms else None


def _room_in(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit = (directory / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "unlimited" as ~2^63
            return None
        usage = int((directory / usage_file).read_text())
        inactive = 0
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
        return max(0, int(limit) - max(0, usage - inactive))
    except (OSError, ValueError):
        return None


def check_fits(label: str, tensors: dict, device, dtype, auto: bool):
    """The dtype to load in: `dtype` when the model fits in `device`'s available memory; with
    `auto` on the CPU, bf16 when only that fits (said once on stderr); otherwise a one-line
    RWKVError with what it needs, what there is, and what to try."""
    import torch

    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "yes", "true", "on"):
        return dtype
    free = available_bytes(device)
    if free is None:
        return dtype
    need = required_bytes(weights_bytes(tensors, dtype), device.type)
    if need <= free:
        return dtype
    name = _dtype_name(dtype)
    where = f"free on {_gpu_name(device)}" if device.type == "cuda" else "available"
    smaller = torch.bfloat16 if device.type == "cpu" else torch.float16
    small_need = required_bytes(weights_bytes(tensors, smaller), device.type)
    if dtype == torch.float32 and small_need <= free and auto:
        notice(f"{label} needs ~{gib(need)} GiB in fp32 but {gib(free)} GiB of memory is {where}: "
               f"loading it in bf16 (~{gib(small_need)} GiB; not bit-exact with fp32)")
        return smaller
    if dtype == torch.float32 and small_need <= free:
        hint = f"use --dtype {_dtype_name(smaller)} (~{gib(small_need)} GiB)"
    elif device.type == "cuda":
        hint = "use a smaller model, or --device cpu"
    else:
        hint = "use a smaller model"
    raise RWKVError(f"{label} needs ~{gib(need)} GiB of memory in {name}, but {gib(free)} GiB is {where}; "
                    f"{hint} (or set {SKIP_ENV}=1 to try anyway)")


def model_label(cfg, tensors: dict) -> str:
    """"RWKV-7 (Goose) 7.2B": the version and its parameter count, for messages."""
    params = sum(t.numel() for t in tensors.values())
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    return f"{cfg.name} {size}"


def _gpu_name(device) -> str:
    import torch

    return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _dtype_name(dtype) -> str:
    from .engine import DTYPES  # the engine imports this module: its names, at call time

    return next(name for name, dt in DTYPES.items() if dt == dtype)


def out_of_memory_message(e: BaseException) -> str | None:
    """A one-line account of an allocation failure that escaped mid-run (torch's CUDA or CPU
    allocator, NumPy), or None if `e` is something else."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    torch = sys.modules.get("torch")  # imported if the failure came from it
    # the caching allocator's error, or CUDA's own (a context, a cuBLAS handle, a kernel's launch)
    cuda_says = isinstance(e, RuntimeError) and re.search(
        r"CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED", text)
    if cuda_says or (torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)):
        return (f"out of GPU memory ({text[:160]}); free some GPU memory, use --device cpu, "
                "or decode fewer sequences at once")
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in text):
        asked = re.search(r"tried to allocate (\d+) bytes", text)  # torch's CPU allocator says how much
        what = f"could not allocate {gib(int(asked[1]))} GiB" if asked else text[:160]
        return f"out of memory ({what}); try --dtype bf16, fewer sequences at once or a smaller model"
    return None
