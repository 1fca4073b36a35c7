"""Compile the CUDA sources in `kernels/` at first use with NVRTC and launch them on torch's stream.

No toolchain is needed on the user's machine: NVRTC (the `nvidia-cuda-nvrtc` library that CUDA
builds of torch already install) is reached through NVIDIA's `cuda-bindings` package, the result
is cached on disk per GPU architecture and source hash, and kernels are launched with the driver
API on `torch.cuda.current_stream()` with tensors' data pointers (so they interleave with torch
ops and are captured by CUDA graphs).

If anything is missing or fails, `kernels_for()` returns None and the reason is printed once on
stderr; callers then use the PyTorch path. `RWKV_KERNELS=torch` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path

from ..errors import notice

SOURCES = ("layernorm", "gemv", "gemm", "rwkv7", "rwkv7_chunk", "rwkv4", "sampling")
HEADERS = ("common.cuh",)
NVRTC_OPTIONS = ("-std=c++17", "--use_fast_math", "-DNDEBUG")

# Kernel signatures: p = pointer (a tensor or None), i = int32, f = float32, S<n> = n raw bytes.
SIGNATURES = {
    "ln_mix": "pppppppp" + "iiii",
    "act_inplace": "pii" + "pii",
    "wkv7_prep": "pppppppppppp" + "pppppp" + "ii",
    "wkv7_post": "ppppppppp" + "ii",
    "wkv7_step": "pppppppp" + "i" + "ppppppppppp" + "i",
    "wkv7_seq": "pppppp" + "ppp" + "ii",
    "wkv7_chunk": "ppppp" + "ppp" + "ii",
    "wkv7_chunk_mats": "pppppp" + "ii",
    "wkv4_seq": "ppppppppppp" + "iii",
    "wkv4_step": "pppppppppppp" + "ii",
    "checked_ids": "pppp" + "i",
    "penalized_softmax": "pppppppp" + "i",
    "nucleus_draw": "ppppppppppppp" + "i",
    "gemm": "pppp" + "iiii" + "lli" + "li",  # l: a 64-bit integer (long long)
}
# The source (kernels/<module>.cu) of each kernel family.
MODULE_OF = {
    "ln_mix": "layernorm", "act_inplace": "layernorm",
    "wkv7_prep": "rwkv7", "wkv7_post": "rwkv7", "wkv7_step": "rwkv7", "wkv7_seq": "rwkv7",
    "wkv7_chunk": "rwkv7_chunk", "wkv7_chunk_mats": "rwkv7_chunk",
    "wkv4_seq": "rwkv4", "wkv4_step": "rwkv4",
    "checked_ids": "sampling", "penalized_softmax": "sampling", "nucleus_draw": "sampling",
    "gemm": "gemm",
}
# one variant, not one per activation dtype
UNSUFFIXED = ("wkv7_seq", "wkv7_chunk", "wkv7_chunk_mats", "wkv4_seq", "checked_ids", "penalized_softmax",
              "nucleus_draw")
# 16-bit variants only (tensor-core products)
HALF_ONLY = ("gemm",)

# Launched as programmatic dependents too (besides gemv): the decoding steps, which read only their
# own state rows (written by an earlier decoding step, complete before this one began) and
# weights before their griddepcontrol.wait.
DEPENDENT_FAMILIES = ("wkv7_step", "wkv4_step")

# struct GemvParams of kernels/gemv.cu: 8 x Seg (10 pointers, 7 ints, a float, 4 ints), n_seg
GEMV_PARAMS_FMT = "@" + "10Q7if4i" * 8 + "i4x"


class KernelError(RuntimeError):
    pass


def torch_device(index: int):
    import torch

    return torch.cuda.device(index)


def source_dir() -> Path:
    """kernels/ of a source checkout, or rwkv_cli/_kernels/ of an installed wheel."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "_kernels", pkg.parent / "kernels"):
        if (d / HEADERS[0]).is_file():
            return d
    raise KernelError(f"kernel sources not found (looked in {pkg / '_kernels'} and {pkg.parent / 'kernels'})")


def cache_dir() -> Path:
    """$RWKV_CLI_HOME/cache/kernels, else $XDG_CACHE_HOME/rwkv-cli/kernels (~/.cache by default)."""
    if os.environ.get("RWKV_CLI_HOME"):
        return Path(os.environ["RWKV_CLI_HOME"]) / "cache" / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rwkv-cli" / "kernels"


def _import_bindings():
    """(nvrtc, driver) from cuda-bindings >= 12 (or the older `cuda` package layout)."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6
        from cuda import nvrtc
    return nvrtc, driver


def _check(result, what: str):
    """cuda-bindings return (err, *values); raise on error, return the values."""
    err, *values = result
    if int(err) != 0:
        raise KernelError(f"{what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values


class Kernel:
    """One compiled kernel, launched with arguments packed into a reused parameter buffer."""

    def __init__(self, driver, func, name: str, sig: str, dependent: bool = False):
        import ctypes

        self.driver, self.func, self.name = driver, func, name
        # programmatic dependent launch: see _launch
        self.config = _dependent_launch_config(driver) if dependent else None
        codes = {"p": "Q", "i": "i", "l": "q", "f": "f"}
        fmt, offsets = "@", []
        for code in sig:
            nxt = fmt + codes[code]
            offsets.append(struct.calcsize(nxt) - struct.calcsize(codes[code]))
            fmt = nxt
        self.fmt, self.sig = fmt, sig
        self.buf = ctypes.create_string_buffer(max(8, struct.calcsize(fmt)))
        base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * len(offsets))(*[base + o for o in offsets])
        self.ptrs_addr = ctypes.addressof(self.ptrs)
        self.lock = threading.Lock()

    def pack(self, args) -> list:
        if len(args) != len(self.sig):
            raise TypeError(f"{self.name} takes {len(self.sig)} arguments, got {len(args)}")
        vals = []
        for code, a in zip(self.sig, args, strict=False):
            if code == "p":
                vals.append(0 if a is None else (a if isinstance(a, int) else a.data_ptr()))
            else:
                vals.append(a)
        return vals

    def __call__(self, grid, block, *args, smem: int = 0, stream: int | None = None):
        if stream is None:
            import torch

            stream = torch.cuda.current_stream().cuda_stream
        grid = (grid, 1, 1) if isinstance(grid, int) else tuple(grid) + (1,) * (3 - len(grid))
        with self.lock:
            struct.pack_into(self.fmt, self.buf, 0, *self.pack(args))
            self._launch(grid, block, smem, stream)

    def _launch(self, grid: tuple, block: int, smem: int, stream: int) -> None:
        """Launch with the parameters in self.buf. A dependent launch (`config`) lets the kernel's
        blocks start while the previous kernel in the stream is finishing; the kernel waits for
        it (griddepcontrol.wait) before it reads anything that kernel may write."""
        if self.config is not None:
            cfg = self.config
            (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ), cfg.blockDimX, cfg.sharedMemBytes = grid, block, smem
            cfg.hStream = self.driver.CUstream(stream)
            _check(self.driver.cuLaunchKernelEx(cfg, self.func, self.ptrs_addr, 0), f"launch of {self.name}")
            return
        _check(self.driver.cuLaunchKernel(self.func, *grid, block, 1, 1, smem, stream, self.ptrs_addr, 0),
               f"launch of {self.name}")


class RawKernel(Kernel):
    """A kernel taking one struct by value: the caller passes the packed bytes (kernels/gemv.cu,
    launched as a programmatic dependent on sm_90+: it reads only its weights before the wait)."""

    def __init__(self, driver, func, name: str, size: int, dependent: bool = False):
        super().__init__(driver, func, name, "", dependent)
        import ctypes

        self.size = size
        self.buf = ctypes.create_string_buffer(size)
        self.ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(self.buf))
        self.ptrs_addr = ctypes.addressof(self.ptrs)

    def launch(self, grid: int, block: int, payload: bytes, smem: int = 0):
        import torch

        stream = torch.cuda.current_stream().cuda_stream
        with self.lock:
            self.buf[: len(payload)] = payload
            self._launch((grid, 1, 1), block, smem, stream)


def _dependent_launch_config(driver):
    """A reusable launch configuration with programmatic stream serialization, or None where
    these bindings lack cuLaunchKernelEx."""
    try:
        cfg = driver.CUlaunchConfig()
        cfg.blockDimY = cfg.blockDimZ = 1
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs = [attr]
        cfg.numAttrs = 1
        driver.cuLaunchKernelEx  # noqa: B018 - present in the bindings
    except AttributeError:
        return None
    return cfg


class Kernels:
    """All kernels for one GPU: `k.ln_mix_f16(grid, block, *args)` etc."""

    def __init__(self, device_index: int):
        import torch

        self.nvrtc, self.driver = _import_bindings()
        self.device_index = device_index
        major, minor = torch.cuda.get_device_capability(device_index)
        self.arch = major * 10 + minor
        # programmatic dependent launches of gemv and the decoding steps (Hopper and later);
        # RWKV_CUDA_PDL=0 turns them off
        self.dependent_launch = self.arch >= 90 and os.environ.get("RWKV_CUDA_PDL", "1") != "0" \
            and _dependent_launch_config(self.driver) is not None  # the bindings have cuLaunchKernelEx
        major_v, minor_v = _check(self.nvrtc.nvrtcVersion(), "nvrtcVersion")
        self.nvrtc_version = f"{major_v}.{minor_v}"
        with torch.cuda.device(device_index):
            torch.empty(1, device="cuda")  # makes torch's (primary) context current on this thread
            _check(self.driver.cuInit(0), "cuInit")
            self.modules = {}
            for name in SOURCES:
                self.modules[name] = self._load(name)
        props = torch.cuda.get_device_properties(device_index)
        # dynamic shared memory a launch may ask for: the opt-in limit less 4 KiB, which covers
        # every kernel's static shared memory (the two must fit together)
        self.optin_smem = int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
        self.max_smem = self.optin_smem - 4096
        self._funcs: dict[str, Kernel] = {}
        self._resolve_all()  # any failure here means: report once and use the PyTorch path

    # -- compilation ----------------------------------------------------------------------------
    def _target(self) -> tuple[str, str]:
        """('-arch=sm_XY', 'cubin') when NVRTC knows this GPU, else PTX for the newest arch it knows."""
        try:
            archs = list(_check(self.nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
        except (KernelError, AttributeError):
            archs = [self.arch]
        if self.arch in archs:
            return f"-arch=sm_{self.arch}", "cubin"
        older = [a for a in archs if a < self.arch]
        if not older:
            raise KernelError(f"NVRTC {self.nvrtc_version} cannot target sm_{self.arch}")
        return f"-arch=compute_{max(older)}", "ptx"

    def _load(self, name: str):
        src_dir = source_dir()
        source = (src_dir / f"{name}.cu").read_text()
        headers = [(h, (src_dir / h).read_text()) for h in HEADERS]
        arch_opt, kind = self._target()
        options = (arch_opt, *NVRTC_OPTIONS)
        key = hashlib.sha256("\0".join([source, *(t for _, t in headers), *options, self.nvrtc_version]).encode())
        path = cache_dir() / f"{name}-{key.hexdigest()[:16]}-{arch_opt.split('=')[1]}.{kind}"
        image = path.read_bytes() if path.is_file() else None
        if image is None:
            image = self._compile(name, source, headers, options, kind)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(image)
                os.replace(tmp, path)
            except OSError:
                pass  # an unwritable cache only costs a recompile next time
        if kind == "ptx" and not image.endswith(b"\0"):
            image += b"\0"
        return _check(self.driver.cuModuleLoadData(image), f"loading {name} ({kind})")

    def _compile(self, name: str, source: str, headers, options, kind: str) -> bytes:
        nv = self.nvrtc
        prog = _check(nv.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), len(headers),
                                            [t.encode() for _, t in headers], [h.encode() for h, _ in headers]),
                      "nvrtcCreateProgram")
        try:
            err = nv.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
            if int(err) != 0:
                size = _check(nv.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
                log = b" " * size
                nv.nvrtcGetProgramLog(prog, log)
                first = next((ln for ln in log.decode(errors="replace").splitlines() if "error" in ln), "")
                raise KernelError(f"NVRTC could not compile {name}.cu: {first.strip() or err}")
            getsize, get = (nv.nvrtcGetCUBINSize, nv.nvrtcGetCUBIN) if kind == "cubin" else (nv.nvrtcGetPTXSize, nv.nvrtcGetPTX)
            size = _check(getsize(prog), "nvrtcGet size")
            image = b" " * size
            _check((get(prog, image)[0], None), "nvrtcGet image")
            return image
        finally:
            nv.nvrtcDestroyProgram(prog)

    # -- lookup ---------------------------------------------------------------------------------
    def _resolve_all(self) -> None:
        import struct as _struct

        for family in SIGNATURES:
            suffixes = ("",) if family in UNSUFFIXED else ("f16", "bf16") if family in HALF_ONLY else ("f16", "bf16", "f32")
            for suffix in suffixes:
                with torch_device(self.device_index):
                    self.get(f"{family}_{suffix}" if suffix else family)
        for dt in ("f16", "bf16"):
            for B in range(1, 5):
                with torch_device(self.device_index):
                    self.raw("gemv", f"gemv_{dt}_b{B}", _struct.calcsize(GEMV_PARAMS_FMT))

    def _allow_smem(self, func, name: str) -> None:
        """Let the kernel use all the dynamic shared memory a block may have (above 48 KB it must ask)."""
        attrs = self.driver.CUfunction_attribute
        static = _check(self.driver.cuFuncGetAttribute(attrs.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, func),
                        f"shared memory size of {name}")
        if static > self.optin_smem - self.max_smem:
            raise KernelError(f"{name} uses {static} bytes of static shared memory")
        if self.optin_smem - static > 48 * 1024:
            _check(self.driver.cuFuncSetAttribute(func, attrs.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                  self.optin_smem - static), f"shared memory for {name}")

    def raw(self, module: str, name: str, size: int) -> RawKernel:
        """A kernel taking one struct of `size` bytes."""
        if name not in self._funcs:
            func = _check(self.driver.cuModuleGetFunction(self.modules[module], name.encode()), f"finding {name}")
            self._allow_smem(func, name)
            self._funcs[name] = RawKernel(self.driver, func, name, size, dependent=self.dependent_launch)
        return self._funcs[name]

    def get(self, name: str) -> Kernel:
        """A kernel by its full name, e.g. 'wkv7_step_f16' (signature from its family)."""
        if name not in self._funcs:
            family = next(f for f in sorted(SIGNATURES, key=len, reverse=True) if name.startswith(f))
            func = _check(self.driver.cuModuleGetFunction(self.modules[MODULE_OF[family]], name.encode()),
                          f"finding {name}")
            self._allow_smem(func, name)
            self._funcs[name] = Kernel(self.driver, func, name, SIGNATURES[family],
                                       dependent=self.dependent_launch and family in DEPENDENT_FAMILIES)
        return self._funcs[name]


# -- availability, reported once -----------------------------------------------------------------
_lock = threading.Lock()
_kernels: dict[int, Kernels | None] = {}
_reason: str | None = None
_noticed = False


def disabled_reason() -> str | None:
    """Why kernels are off before even trying (RWKV_KERNELS=torch), else None."""
    choice = os.environ.get("RWKV_KERNELS", "auto").lower()
    if choice in ("torch", "off", "0", "none"):
        return f"disabled by RWKV_KERNELS={os.environ['RWKV_KERNELS']}"
    return None


def kernels_for(device) -> Kernels | None:
    """The compiled kernels for a CUDA device, or None (the reason printed once on stderr)."""
    global _reason, _noticed
    index = device.index if getattr(device, "index", None) is not None else 0
    if index in _kernels:
        return _kernels[index]
    with _lock:
        if index in _kernels:
            return _kernels[index]
        off = disabled_reason()
        result = None
        if off is None:
            try:
                _import_bindings()
            except ImportError as e:
                _reason = f"cuda-bindings is not installed ({e}); pip install 'rwkv-cli[cuda]'"
            else:
                try:
                    result = Kernels(index)
                except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch path
                    _reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        else:
            _reason = off
        if result is None and off is None and not _noticed:
            _noticed = True
            notice(f"fused CUDA kernels unavailable ({_reason}); using the PyTorch path")
        _kernels[index] = result
        return result


def status() -> str | None:
    """The reason the kernels are off (after a `kernels_for` call), else None."""
    return _reason


def reset() -> None:
    """Forget loaded kernels and the reported reason (tests)."""
    global _reason, _noticed
    with _lock:
        _kernels.clear()
        _reason, _noticed = None, False
