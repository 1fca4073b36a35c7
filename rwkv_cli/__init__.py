"""rwkv-cli: run RWKV language models from the terminal.

RWKV ("RWKV: Reinventing RNNs for the Transformer Era", Peng et al. 2023) trains in parallel like a
Transformer and runs as an RNN: constant memory and time per token. This package holds the engine
(pure PyTorch, with CUDA kernels where available), checkpoint loading, and the `rwkv` command.

Importing the package is cheap: torch is imported only when the engine is first used.
"""

import os as _os

__version__ = "0.1.0"

# The CPU decoding step's products run in NumPy's OpenBLAS, whose threads by default keep spinning
# for ~0.1 s (2^28 cycles) after each call; a prompt right after decoding (every chat turn) then
# runs its oneDNN products against them on the same cores, 20-30% slower on 2 cores. 2^20 cycles
# (~0.4 ms) keeps them awake between one token's products and lets them sleep soon after. Only a
# default (the user's setting wins), and only effective before NumPy is first imported.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

__all__ = ["__version__", "load_model", "ModelConfig", "RWKVError"]


def __getattr__(name: str):
    # Lazy public API, so `import rwkv_cli` (and `rwkv --help`) never pays for torch.
    if name == "load_model":
        from .engine import load_model

        return load_model
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    if name == "RWKVError":
        from .errors import RWKVError

        return RWKVError
    raise AttributeError(f"module 'rwkv_cli' has no attribute {name!r}")
