"""Architecture detection and configuration, inferred from tensor names and shapes only.

Everything here works on a `{name: shape}` map, without torch, so tools can describe a checkpoint
from a safetensors header alone. The rules follow the reference notes (`rwkv-models.md` §3-§5):
the version comes from tell-tale tensors, and every size (layers, width, heads, head size, vocab,
LoRA ranks, FFN width) from shapes, never from file names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import CheckpointError, UnsupportedModelError

Shapes = dict[str, tuple[int, ...]]

SUPPORTED_VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7", "7a")
VERSION_NAMES = {
    "4": "RWKV-4",
    "5.0": "RWKV-5.0",
    "5.1": "RWKV-5.1",
    "5.2": "RWKV-5.2 (Eagle)",
    "6": "RWKV-6 (Finch)",
    "7": "RWKV-7 (Goose)",
    "7a": "RWKV-7a (DeepEmbed)",
    "7b": "RWKV-7b (DeepEmbed + DEA attention)",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
V7_LORAS = ("w", "a", "v", "g")  # decay, in-context learning rate, value residual, output gate
V5_VERSIONS = ("5.0", "5.1", "5.2")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of an RWKV model. `n_head`/`head_size` are 0 for RWKV-4, which has no heads."""

    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int
    dim_att: int
    n_head: int = 0
    head_size: int = 0
    # LoRA ranks by name: v7 (w, a, v, g); v6 (mix: D_mix of time_maa_w1/w2, decay: D_decay);
    # v7a also s: the DeepEmbed rank R of ffn.s1 [C, R] / ffn.s2 [R, F] (§5, §7.5)
    lora: dict[str, int] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """`version`, or "7a" for an RWKV-7 DeepEmbed model. A 7a model is an RWKV-7 (same state,
        same time-mix: `version` stays "7") whose channel-mix also reads the token id (§7.5)."""
        return "7a" if self.version == "7" and "s" in self.lora else self.version

    @property
    def deep_embed_width(self) -> int:
        """Columns of `ffn.s_emb.weight` [V, R * R] (1024 in released 7a models), 0 without DeepEmbed."""
        return self.lora.get("s", 0) ** 2

    @property
    def name(self) -> str:
        return VERSION_NAMES[self.variant]

    @property
    def tokenizer(self) -> str:
        """Tokenizer family by vocabulary rows (`rwkv-models.md` §13.3)."""
        if self.vocab_size == 65536:
            return "world"
        if self.vocab_size in (50277, 50304):
            return "gpt-neox-20b"
        return "unknown"

    def state_numel(self) -> int:
        """Numbers in the recurrent state of one sequence (§9)."""
        if self.version == "4":
            return self.n_layer * (2 * self.n_embd + 3 * self.dim_att)
        return self.n_layer * (2 * self.n_embd + self.n_head * self.head_size**2)

    def describe(self) -> str:
        heads = f", {self.n_head} heads x {self.head_size}" if self.n_head else ""
        return f"{self.name}: {self.n_layer} layers, width {self.n_embd}{heads}, vocab {self.vocab_size}"


def detect_version(shapes: Shapes) -> str:
    """The RWKV version from tell-tale tensors (§3), in the documented order: "4" ... "7", or "7a"
    for DeepEmbed (`ffn.s_emb.weight`). Raises for non-models and for refused variants.

    `shapes` must use BlinkDL names: other layouts are renamed first (`rwkv_cli.layouts`)."""
    names = set(shapes)
    if not ("emb.weight" in names or any(n.startswith("blocks.") for n in names)):
        sample = ", ".join(sorted(names)[:4]) or "no tensors"
        raise CheckpointError(f"not an RWKV checkpoint: no emb.weight / blocks.N tensors (found {sample})")
    if all(re.fullmatch(r"blocks\.\d+\.att\.time_state", n) for n in names):
        raise CheckpointError("a state-tuned file (only blocks.N.att.time_state), not a model: "
                              "use it with `rwkv chat --init-state`")
    pre = sorted(n for n in names if n in ("_strategy", "_version", "_rescale_layer"))
    if pre:
        raise UnsupportedModelError(
            f"pre-converted ChatRWKV file ({pre[0]} present): its weights are already transposed and "
            "rescaled; use the original .pth file"
        )
    if "blocks.0.att.r_k" in names or "blocks.0.att.a0" in names:
        # 7b first: it carries DeepEmbed's ffn.s_emb too (§5)
        if any(re.match(r"^blocks\.\d+\.qkv\.", n) for n in names):
            raise UnsupportedModelError(_refusal("7b", "blocks.N.qkv.*"))
        if any(n.endswith("ffn.s_emb.weight") for n in names):
            return "7a"
        return "7"
    if "blocks.0.att.time_maa_x" in names:
        return "6"
    decay = shapes.get("blocks.0.att.time_decay", ())
    if len(decay) == 2 and decay[1] > 1:
        return "5.2"
    if "blocks.0.att.gate.weight" in names:
        return "5.1"
    if "blocks.0.att.ln_x.weight" in names:
        return "5.0"
    return "4"


def _refusal(version: str, marker: str) -> str:
    return (
        f"{VERSION_NAMES[version]} checkpoint ({marker} present) is recognised but not supported yet; "
        f"supported: {', '.join(VERSION_NAMES[v] for v in SUPPORTED_VERSIONS)}"
    )


def _layers(names) -> int:
    ids = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    if not ids:
        raise CheckpointError("no blocks.N.* tensors: not an RWKV checkpoint")
    return max(ids) + 1


def _need_any(shapes: Shapes, name: str) -> tuple[int, ...]:
    if name not in shapes or not shapes[name]:
        raise CheckpointError(f"missing tensor {name}")
    return shapes[name]


def _need(shapes: Shapes, name: str, ndim: int) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"missing tensor {name}")
    shape = shapes[name]
    if len(shape) != ndim:
        raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def infer_config(shapes: Shapes) -> ModelConfig:
    """Detect the version and read every size from tensor shapes (§4). Names in another layout
    (Hugging Face, fla-hub, prefixed) are mapped to BlinkDL names first."""
    from .layouts import canonical_shapes

    shapes = canonical_shapes(shapes)
    version = detect_version(shapes)
    vocab, n_embd = _need(shapes, "emb.weight", 2)
    width = shapes.get("blocks.0.ln1.weight", ())
    if len(width) == 1 and width[0] != n_embd:  # else every tensor of the layers reads as mis-shaped
        raise CheckpointError(f"emb.weight is {vocab} x {n_embd}, but the layers are {width[0]} wide "
                              "(blocks.0.ln1.weight)")
    n_layer = _layers(shapes)
    dim_att = _need(shapes, "blocks.0.att.key.weight", 2)[0]
    ffn_dim = _need(shapes, "blocks.0.ffn.key.weight", 2)[0]
    if version == "4":
        return ModelConfig("4", n_layer, n_embd, vocab, ffn_dim, dim_att)
    if version in V5_VERSIONS:
        # H from time_decay [H] (5.0/5.1) or [H, N] (5.2); N = n_att / H (§4)
        n_head = _need_any(shapes, "blocks.0.att.time_decay")[0]
        if n_head <= 0 or dim_att % n_head:
            raise CheckpointError(f"att.time_decay has {n_head} heads, which do not divide n_att = {dim_att}")
        return ModelConfig(version, n_layer, n_embd, vocab, ffn_dim, dim_att, n_head, dim_att // n_head)
    if version == "6":
        bonus = "time_first" if "blocks.0.att.time_first" in shapes else "time_faaaa"
        n_head, head_size = _need(shapes, "blocks.0.att." + bonus, 2)
        lora = {
            "mix": _need(shapes, "blocks.0.att.time_maa_w1", 2)[1] // 5,  # [C, 5 * D_mix]: w, k, v, r, g
            "decay": _need(shapes, "blocks.0.att.time_decay_w1", 2)[1],  # [C, D_decay]
        }
        return ModelConfig("6", n_layer, n_embd, vocab, ffn_dim, dim_att, n_head, head_size, lora)
    n_head, head_size = _need(shapes, "blocks.0.att.r_k", 2)
    lora = {}
    for name in V7_LORAS:
        # Layer 0 has no value-residual LoRA in current files (§5), so read ranks from the last layer.
        key = f"blocks.{n_layer - 1}.att.{name}1"
        lora[name] = shapes[key][1] if key in shapes and len(shapes[key]) == 2 else 0
    if n_layer > 1 and lora["v"] == 0:
        raise CheckpointError(f"missing tensor blocks.{n_layer - 1}.att.v1")
    if version == "7a":
        lora["s"] = _deep_embed_rank(shapes)
    return ModelConfig("7", n_layer, n_embd, vocab, ffn_dim, dim_att, n_head, head_size, lora)


def _deep_embed_rank(shapes: Shapes) -> int:
    """R of RWKV-7a's DeepEmbed (§5, §7.5): ffn.s1 is [C, R] and each ffn.s_emb row [R * R] is
    read as an R x R matrix (R = 32, rows of 1024, in released models)."""
    rank = _need(shapes, "blocks.0.ffn.s1", 2)[1]
    width = _need(shapes, "blocks.0.ffn.s_emb.weight", 2)[1]
    if rank <= 0 or width != rank * rank:
        raise CheckpointError(f"ffn.s_emb.weight rows hold {width} values, not ffn.s1's rank squared {rank}^2")
    return rank


def expected_shapes(cfg: ModelConfig, names=()) -> tuple[Shapes, set[str]]:
    """Every tensor a checkpoint of this config must hold, with its shape, plus tolerated extras.

    `names` (the file's tensor names) picks between the two names of the v5/v6 bonus: a file holds
    `time_faaaa` (used raw) or `time_first` (exponentiated), §3."""
    C, A, F, V = cfg.n_embd, cfg.dim_att, cfg.ffn_dim, cfg.vocab_size
    vec = (1, 1, C)
    want: Shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    optional: set[str] = set()
    for i in range(cfg.n_layer):
        b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            want[b + ln + ".weight"] = want[b + ln + ".bias"] = (C,)
        if cfg.version in V5_VERSIONS or cfg.version == "6":
            want.update(_v5_v6_layer(cfg, att, ffn, att + "time_first" in names))
        elif cfg.version == "4":
            want[att + "time_decay"] = want[att + "time_first"] = (A,)
            for m in ("k", "v", "r"):
                want[att + f"time_mix_{m}"] = vec
            for m in ("key", "value", "receptance"):
                want[att + m + ".weight"] = (A, C)
            want[att + "output.weight"] = (C, A)
            want[ffn + "time_mix_k"] = want[ffn + "time_mix_r"] = vec
            want[ffn + "receptance.weight"] = (C, C)
        else:
            H, N = cfg.n_head, cfg.head_size
            for m in ("r", "w", "k", "v", "a", "g"):
                want[att + f"x_{m}"] = vec
            for name in V7_LORAS:
                rank = cfg.lora[name]
                target = optional if (name == "v" and i == 0) else None
                shapes = {att + f"{name}1": (C, rank), att + f"{name}2": (rank, C)}
                if name != "g":
                    shapes[att + f"{name}0"] = vec
                if target is not None:  # layer 0's value residual is never used; accept it if present
                    optional.update(shapes)
                else:
                    want.update(shapes)
            want[att + "k_k"] = want[att + "k_a"] = vec
            want[att + "r_k"] = (H, N)
            for m in ("receptance", "key", "value"):
                want[att + m + ".weight"] = (A, C)
            want[att + "output.weight"] = (C, A)
            want[att + "ln_x.weight"] = want[att + "ln_x.bias"] = (A,)
            want[ffn + "x_k"] = vec
            if "s" in cfg.lora:  # RWKV-7a DeepEmbed (§5)
                R = cfg.lora["s"]
                want[ffn + "s_emb.weight"], want[ffn + "s_emb_x.weight"] = (V, R * R), (R * R, C)
                want[ffn + "s1"], want[ffn + "s2"], want[ffn + "s0"] = (C, R), (R, F), (1, 1, F)
        want[ffn + "key.weight"] = (F, C)
        want[ffn + "value.weight"] = (C, F)
        optional.add(att + "time_state")  # a state-tuned initial state embedded in the model (§12)
    want.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return want, optional


def _v5_v6_layer(cfg: ModelConfig, att: str, ffn: str, time_first: bool) -> Shapes:
    """The per-layer tensors of RWKV-5.x and RWKV-6 (§5), except the norms and ffn key/value."""
    C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
    vec = (1, 1, C)
    want: Shapes = {}
    bonus = att + ("time_first" if time_first else "time_faaaa")
    for m in ("receptance", "key", "value"):
        want[att + m + ".weight"] = (A, C)
    want[att + "output.weight"] = (C, A)
    want[att + "ln_x.weight"] = want[att + "ln_x.bias"] = (A,)
    if cfg.version != "5.0":
        want[att + "gate.weight"] = (A, C)
    if cfg.version == "6":
        for m in ("x", "w", "k", "v", "r", "g"):
            want[att + f"time_maa_{m}"] = vec
        D_mix, D_decay = cfg.lora["mix"], cfg.lora["decay"]
        want[att + "time_maa_w1"], want[att + "time_maa_w2"] = (C, 5 * D_mix), (5, D_mix, C)
        want[att + "time_decay"] = (1, 1, A)
        want[att + "time_decay_w1"], want[att + "time_decay_w2"] = (C, D_decay), (D_decay, A)
        want[bonus] = (H, N)
        want[ffn + "time_maa_k"] = want[ffn + "time_maa_r"] = vec
    else:
        for m in ("k", "v", "r") + (("g",) if cfg.version != "5.0" else ()):
            want[att + f"time_mix_{m}"] = vec
        want[att + "time_decay"] = want[bonus] = (H, N) if cfg.version == "5.2" else (H,)
        want[ffn + "time_mix_k"] = want[ffn + "time_mix_r"] = vec
    want[ffn + "receptance.weight"] = (C, C)
    return want


def _same_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # Vectors stored as [C], [1, C] or [1, 1, C] are the same parameter; v5.0/5.1 per-head
    # decays and bonuses may be stored as [H] or [H, 1].
    if got == want:
        return True
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    if len(want) == 1 and name.endswith(("time_decay", "time_first", "time_faaaa")):
        return len(got) == 2 and got == (want[0], 1)
    return len(want) == 3 and squeeze(got) == squeeze(want) and len(squeeze(want)) == 1


def validate(shapes: Shapes, cfg: ModelConfig) -> None:
    """Raise a CheckpointError that lists missing, unexpected and mis-shaped tensors."""
    want, optional = expected_shapes(cfg, shapes)
    missing = [n for n in want if n not in shapes]
    unexpected = [n for n in shapes if n not in want and n not in optional]
    wrong = [
        f"{n} {list(shapes[n])} (expected {list(want[n])})"
        for n in want
        if n in shapes and not _same_shape(n, shapes[n], want[n])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_short(missing)}")
    if wrong:
        problems.append(f"mis-shaped: {_short(wrong)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_short(unexpected)}")
    if problems:
        raise CheckpointError(f"does not look like a complete {cfg.name} checkpoint: " + "; ".join(problems))


def _short(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
