"""Random RWKV checkpoints in the real file formats, for tests and benchmarks.

The weights are random but shaped and scaled like trained ones, so the models behave like real
ones: peaked logits, bounded states, decays spread over the range training produces (RWKV-LM's
initialisation). Nothing here is used at run time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def lora_rank(n_embd: int, factor: float, power: float) -> int:
    """RWKV-LM's LoRA size rule: max(32, round(f * C^p / 32) * 32)."""
    return max(32, int(round(factor * n_embd**power / 32)) * 32)


V7_LORA_RULES = {"w": (1.8, 0.5), "a": (1.8, 0.5), "v": (1.3, 0.5), "g": (0.6, 0.8)}
V6_LORA = {"mix": 32, "decay": 64}  # RWKV-LM's D_MIX_LORA and D_DECAY_LORA at released sizes
V5_V6 = ("5.0", "5.1", "5.2", "6")
DEEP_EMBED_RANK = 32  # RWKV-7a: s1 [C, 32], s_emb rows of 32 x 32 = 1024 (released models)


def ffn_width(version: str, n_embd: int) -> int:
    """4C for RWKV-4/7; 3.5C rounded down to a multiple of 32 for RWKV-5/6 (their training code)."""
    return int(3.5 * n_embd) // 32 * 32 if version in V5_V6 else 4 * n_embd


def random_state_dict(
    version: str,
    n_layer: int,
    n_embd: int,
    vocab_size: int | None = None,
    head_size: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    layer0_value_lora: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors of a random RWKV-4, 5.0, 5.1, 5.2, 6, 7 or 7a model, BlinkDL names (`rwkv-models.md` §5)."""
    if version == "7a":  # RWKV-7 plus DeepEmbed tensors in every channel-mix (§5, §7.5)
        sd = random_state_dict("7", n_layer, n_embd, vocab_size, head_size, seed, torch.float32,
                               layer0_value_lora)
        sd.update(_deep_embed_tensors(n_layer, n_embd, sd["emb.weight"].shape[0], seed))
        return {k: v.to(dtype).contiguous() for k, v in sd.items()}
    gen = torch.Generator().manual_seed(seed)
    C = n_embd
    V = vocab_size or (50277 if version == "4" else 65536)  # RWKV-5/6/7 models use the World vocabulary

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    def uniform(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    ramp = torch.linspace(0, 1, C)  # per-channel position, as in RWKV-LM's init
    ones_ish = lambda: 1 + normal(C, std=0.1)  # noqa: E731  LayerNorm weights of a trained model
    sd = {"emb.weight": normal(V, C, std=0.5)}
    sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"] = ones_ish(), normal(C, std=0.05)
    for i in range(n_layer):
        b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = ones_ish(), normal(C, std=0.05)
        mat = lambda rows, cols, gain=1.0: normal(rows, cols, std=gain / math.sqrt(cols))  # noqa: E731
        if version == "4":
            # Decays from very fast (w = -e^3) to very slow (w = -e^-5), as initialised in RWKV-LM.
            sd[att + "time_decay"] = -5 + 8 * ramp ** (0.7 + 1.3 * i / max(1, n_layer - 1)) + normal(C, std=0.3)
            sd[att + "time_first"] = math.log(0.3) + normal(C, std=0.5)
            for m in ("k", "v", "r"):
                sd[att + f"time_mix_{m}"] = uniform(1, 1, C)
            for m in ("key", "value", "receptance", "output"):
                sd[att + m + ".weight"] = mat(C, C)
            sd[ffn + "time_mix_k"], sd[ffn + "time_mix_r"] = uniform(1, 1, C), uniform(1, 1, C)
            sd[ffn + "receptance.weight"] = mat(C, C)
        elif version == "7":
            H = C // head_size
            for m in ("r", "w", "k", "v", "a", "g"):
                sd[att + f"x_{m}"] = uniform(1, 1, C)
            ranks = {name: lora_rank(C, *rule) for name, rule in V7_LORA_RULES.items()}
            # w0 spans slow to fast decays (RWKV-LM: -7 + 5 * ramp^..., plus 0.5)
            sd[att + "w0"] = (-6.5 + 5 * ramp ** (0.85 + i / max(1, n_layer - 1)) + normal(C, std=0.3)).view(1, 1, C)
            sd[att + "a0"] = normal(1, 1, C, std=0.5)
            for name, rank in ranks.items():
                if name == "v" and i == 0 and not layer0_value_lora:
                    continue  # layer 0 has no value residual (current training code omits it)
                sd[att + f"{name}1"] = normal(C, rank, std=0.1)
                sd[att + f"{name}2"] = normal(rank, C, std=0.1)
            if i > 0 or layer0_value_lora:
                sd[att + "v0"] = normal(1, 1, C, std=0.5, mean=1.0)
            sd[att + "k_k"] = normal(1, 1, C, std=0.05, mean=0.85)
            sd[att + "k_a"] = normal(1, 1, C, std=0.05, mean=1.0)
            sd[att + "r_k"] = normal(H, head_size, std=0.1)
            for m in ("receptance", "key", "value", "output"):
                sd[att + m + ".weight"] = mat(C, C)
            sd[att + "ln_x.weight"], sd[att + "ln_x.bias"] = ones_ish(), normal(C, std=0.05)
            sd[ffn + "x_k"] = uniform(1, 1, C)
        elif version in V5_V6:
            sd.update(_v5_v6_layer(version, i, n_layer, C, head_size, normal, uniform, mat))
        else:
            raise ValueError(f"random checkpoints exist for RWKV-4, 5.0-5.2, 6, 7 and 7a, not {version!r}")
        F = ffn_width(version, C)
        sd[ffn + "key.weight"] = mat(F, C)
        sd[ffn + "value.weight"] = mat(C, F, gain=0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = ones_ish(), normal(C, std=0.05)
    sd["head.weight"] = normal(V, C, std=2 / math.sqrt(C))
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _v5_v6_layer(version, i, n_layer, C, N, normal, uniform, mat) -> dict:
    """One RWKV-5.x/6 layer's attention tensors plus its channel-mix mixes and receptance.

    Decays span RWKV-LM's initial range (time_decay from -6, slow, up to about +1, where a channel
    keeps e^-e = 7% per token), and the LoRAs are scaled so the data-dependent mixes and decays
    move by a few tenths, as in trained models. 5.0 stores its bonus as `time_first` (used as
    exp), the others as `time_faaaa` (used raw), so both rules of §3 are exercised.
    """
    H = C // N
    att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    depth = i / max(1, n_layer - 1)
    ramp = torch.linspace(0, 1, C)
    sd = {}
    decay = -6 + 7 * ramp ** (0.7 + 1.3 * depth) + normal(C, std=0.3)  # per channel, slow to fast
    bonus = 0.5 * (1 - ramp) + 0.1 * (torch.arange(C) % 3 - 1) + normal(C, std=0.1)
    if version == "6":
        for m in ("x", "w", "k", "v", "r", "g"):
            sd[att + f"time_maa_{m}"] = uniform(1, 1, C)
        D, D_w = V6_LORA["mix"], V6_LORA["decay"]
        sd[att + "time_maa_w1"] = normal(C, 5 * D, std=1 / math.sqrt(C))
        sd[att + "time_maa_w2"] = normal(5, D, C, std=0.5 / math.sqrt(D))
        sd[att + "time_decay"] = decay.view(1, 1, C)
        sd[att + "time_decay_w1"] = normal(C, D_w, std=1 / math.sqrt(C))
        sd[att + "time_decay_w2"] = normal(D_w, C, std=0.5 / math.sqrt(D_w))
        sd[att + "time_faaaa"] = bonus.view(H, N)
        sd[ffn + "time_maa_k"], sd[ffn + "time_maa_r"] = uniform(1, 1, C), uniform(1, 1, C)
    else:
        for m in ("k", "v", "r") + (("g",) if version != "5.0" else ()):
            sd[att + f"time_mix_{m}"] = uniform(1, 1, C)
        if version == "5.2":
            sd[att + "time_decay"], sd[att + "time_faaaa"] = decay.view(H, N), bonus.view(H, N)
        else:  # one decay and bonus per head
            head_ramp = torch.linspace(0, 1, H)
            sd[att + "time_decay"] = -6 + 6.5 * head_ramp ** (0.7 + 1.3 * depth) + normal(H, std=0.3)
            head_bonus = 0.3 + normal(H, std=0.1)
            if version == "5.0":
                sd[att + "time_first"] = torch.log(head_bonus.clamp(min=0.05))
            else:
                sd[att + "time_faaaa"] = head_bonus
        sd[ffn + "time_mix_k"], sd[ffn + "time_mix_r"] = uniform(1, 1, C), uniform(1, 1, C)
    for m in ("receptance", "key", "value", "output") + (("gate",) if version != "5.0" else ()):
        sd[att + m + ".weight"] = mat(C, C)
    sd[att + "ln_x.weight"], sd[att + "ln_x.bias"] = 1 + normal(C, std=0.1), normal(C, std=0.05)
    sd[ffn + "receptance.weight"] = mat(C, C)
    return sd


def _deep_embed_tensors(n_layer: int, C: int, V: int, seed: int, R: int = DEEP_EMBED_RANK) -> dict:
    """RWKV-7a's per-layer DeepEmbed tensors (§5), scaled so that each step of the factor
    (x~ s1) M_tok s2 + s0 (§7.5) has entries of about unit size until s2: the factor then stays
    near s0 ~ 1 and moves the FFN's hidden units by about +-30% per token, a gentle modulation.
    M_tok gets half of its variance from s_emb and half from LN0(emb) s_emb_x^T."""
    gen = torch.Generator().manual_seed(seed + 7919)
    normal = lambda *shape, std=1.0, mean=0.0: torch.randn(*shape, generator=gen) * std + mean  # noqa: E731
    F = ffn_width("7", C)
    sd = {}
    for i in range(n_layer):
        ffn = f"blocks.{i}.ffn."
        sd[ffn + "s_emb.weight"] = normal(V, R * R, std=(0.5 / R) ** 0.5)  # [V, R*R]
        sd[ffn + "s_emb_x.weight"] = normal(R * R, C, std=(0.5 / (R * C)) ** 0.5)  # [R*R, C]
        sd[ffn + "s1"] = normal(C, R, std=C**-0.5)  # x~ s1 ~ N(0, 1) per entry
        sd[ffn + "s2"] = normal(R, F, std=0.3 * R**-0.5)
        sd[ffn + "s0"] = normal(1, 1, F, std=0.1, mean=1.0)
    return sd


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save as BlinkDL .pth (torch.save zip) or safetensors, by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def random_checkpoint(path: str | Path, version: str, n_layer: int, n_embd: int, **kwargs) -> Path:
    """Write a random checkpoint and return its path (see `random_state_dict` for the options)."""
    return write_checkpoint(path, random_state_dict(version, n_layer, n_embd, **kwargs))


# Names of the reference's flat state list entries, per layer, in pip order (`rwkv-models.md` §9).
REFERENCE_STATE_FIELDS = {
    "4": ("att_shift", "wkv_num", "wkv_den", "wkv_max", "ffn_shift"),
    "7": ("att_shift", "wkv", "ffn_shift"),
    "7a": ("att_shift", "wkv", "ffn_shift"),
    **{v: ("att_shift", "wkv", "ffn_shift") for v in ("5.0", "5.1", "5.2", "6")},
}


def reference_state_as_dict(flat: dict[str, torch.Tensor], prefix: str, version: str) -> dict[str, torch.Tensor]:
    """The reference's `{prefix}.state.{j}` tensors renamed to our `blocks.{i}.{field}` (batch 1 added)."""
    fields = REFERENCE_STATE_FIELDS[version]
    n = sum(1 for k in flat if k.startswith(prefix + ".state."))
    return {
        f"blocks.{j // len(fields)}.{fields[j % len(fields)]}": flat[f"{prefix}.state.{j}"].unsqueeze(0)
        for j in range(n)
    }


def run_reference(version: str, jobs: list[dict], workdir: str | Path, timeout: float = 900, env: dict | None = None) -> list[dict]:
    """Run jobs through BlinkDL's `rwkv` package in a child process with its environment flags.

    Each job is {"checkpoint", "prompt", "steps"[, "strategy"]}; returns the loaded outputs
    (see `rwkv_cli._reference_worker`). Needs the `rwkv` test dependency. `env` adds variables
    for the child, e.g. {"RWKV_CUDA_ON": "1"} with a "cuda fp16" strategy (the reference then
    builds its CUDA extension with nvcc and ninja). `version` "7" runs the RWKV-7 class
    (RWKV_V7_ON=1), "7a" its DeepEmbed variant (also RWKV_DE_VERSION=1), anything else the legacy class.
    """
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    full = []
    for n, job in enumerate(jobs):
        full.append({"strategy": "cpu fp32", **job, "out": str(workdir / f"reference-{version}-{n}.safetensors")})
    spec = workdir / f"reference-jobs-{version}.json"
    spec.write_text(json.dumps(full))
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_cli._reference_worker", str(spec)],
        env={**reference_env(version), **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reference engine failed:\n{proc.stderr[-3000:]}")
    return [load_file(job["out"]) for job in full]


def reference_env(version: str, cuda: bool = False) -> dict[str, str]:
    """The environment BlinkDL's `rwkv` package must be imported under for `version`: it picks its
    class at import time (RWKV_V7_ON for RWKV-7, RWKV_DE_VERSION for 7a DeepEmbed), so one process
    runs one family. `cuda` also builds its CUDA extension (RWKV_CUDA_ON=1: needs nvcc and ninja)."""
    import os

    env = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="1" if cuda else "0")
    env.pop("RWKV_V7_ON", None)
    env.pop("RWKV_DE_VERSION", None)
    if version in ("7", "7a"):
        env["RWKV_V7_ON"] = "1"
    if version == "7a":
        env["RWKV_DE_VERSION"] = "1"
    return env


def bench_checkpoint(workdir: str | Path, spec: str) -> tuple[str, Path]:
    """A benchmark's random checkpoint for "VERSION:LAYERS:WIDTH[:VOCAB]", written once into
    `workdir` and reused. The vocabulary defaults to the family's: 50277 for RWKV-4, else 65536."""
    version, layers, width, *vocab = spec.split(":")
    vocab_size = int(vocab[0]) if vocab else (50277 if version == "4" else 65536)
    path = Path(workdir) / f"random-v{version}-L{layers}-C{width}-V{vocab_size}.pth"
    if not path.exists():
        random_checkpoint(path, version, int(layers), int(width), vocab_size=vocab_size)
    return version, path
