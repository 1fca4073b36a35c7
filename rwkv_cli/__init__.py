"""rwkv-cli: run RWKV language models from the terminal.

RWKV ("RWKV: Reinventing RNNs for the Transformer Era", Peng et al. 2023) trains in parallel like a
Transformer and runs as an RNN: constant memory and time per token. This package holds the engine
(pure PyTorch, with CUDA kernels where available), checkpoint loading, and the `rwkv` command.

Importing the package is cheap: torch is imported only when the engine is first used.
"""

__version__ = "0.1.0"

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
