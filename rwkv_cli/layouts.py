"""Checkpoint layouts: every tensor-naming scheme in circulation, mapped to BlinkDL names in one place.

The loader, detection and validation only know BlinkDL names (`emb.weight`, `blocks.N.att.key.weight`,
...). Files in another layout are renamed here, straight from the file, with no conversion step
(`rwkv-models.md` §3 "layout first", §11):

* ``blinkdl``: native names (BlinkDL `.pth`, web-rwkv `.st`, `rwkv convert` output). Unchanged.
* ``hf``: Hugging Face transformers RWKV-4 (`RwkvForCausalLM`) and the RWKV-5/6 remote-code repos:
  `rwkv.` prefix, `embeddings`, `pre_ln`, `attention`, `feed_forward`, `time_mix_key` ... (§11.1-2).
* ``fla``: fla-hub RWKV-7 (`RWKV7ForCausalLM`): `model.layers.N.attn.r_proj`, LoRA pairs as
  `*_lora.lora.{0,2}` stored [out, in] (transposed here), vectors squeezed, and in the legacy
  revision the six token-shift mixes fused as `attn.x_x` [6, C] in the order r, w, k, v, a, g (§11.3).
* ``prefixed``: native names under a prefix (transformers PR #47780's `rwkv7.`, the official
  RWKV-org safetensors), with `head.weight` possibly bare (§11.4).
* ``gguf`` (llama.cpp `blk.N.*` names): recognised and refused.

A plan maps each source name to its BlinkDL name(s) and a transform, so the same rules rename a
header's shapes (`canonical_shapes`, no torch) and a file's tensors (`canonical_tensors`, views
only: nothing is copied until the model casts its weights).
"""

from __future__ import annotations

import re

from .errors import UnsupportedModelError

# A transform: None (as is), "t" (transpose a matrix), "vec" (a vector as [1, 1, C]) or
# ("row", j): row j of a fused [6, C] tensor, as [1, 1, C].
FLA_FUSED_MIX = ("r", "w", "k", "v", "a", "g")  # row order of the legacy fla `attn.x_x`

_BLOCK = re.compile(r"^blocks\.\d+\.")


def detect_layout(names) -> str:
    """'blinkdl', 'hf', 'fla', 'prefixed', 'gguf' or 'unknown', from the tensor names alone."""
    names = set(names)
    if any(n.startswith(("blk.", "token_embd.")) for n in names):
        return "gguf"
    if "emb.weight" in names or any(_BLOCK.match(n) for n in names):
        return "blinkdl"
    if any(n.startswith(("model.layers.", "model.embeddings.")) for n in names):
        return "fla"
    hf_block = re.compile(r"^rwkv\.blocks\.\d+\.(attention|feed_forward)\.")
    if any(n.startswith("rwkv.embeddings.") or hf_block.match(n) for n in names):
        return "hf"
    if _native_prefix(names):
        return "prefixed"
    return "unknown"


def _native_prefix(names) -> str | None:
    """The prefix in front of native names (`rwkv7.emb.weight` -> `rwkv7.`), if there is one."""
    for n in sorted(names):
        m = re.match(r"^(.+\.)(emb\.weight|blocks\.\d+\.)", n)
        if m:
            return m.group(1)
    return None


def plan(names) -> tuple[str, dict[str, list]]:
    """(layout, {source name: [(BlinkDL name, transform), ...]}) for a file's tensor names."""
    layout = detect_layout(names)
    if layout == "gguf":
        raise UnsupportedModelError(
            "llama.cpp GGUF tensor names (blk.N.*) are not supported; use the original BlinkDL .pth file"
        )
    if layout == "hf":
        return layout, {n: [(_hf_name(n), None)] for n in names}
    if layout == "fla":
        return layout, {n: _fla_names(n) for n in names}
    if layout == "prefixed":
        prefix = _native_prefix(names)
        return layout, {n: [(n.removeprefix(prefix), None)] for n in names}
    return layout, {n: [(n, None)] for n in names}


def canonical_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes under BlinkDL names (an identity for files already in that layout)."""
    layout, rules = plan(shapes)
    if layout in ("blinkdl", "unknown"):
        return shapes
    out = {}
    for src, targets in rules.items():
        for dst, op in targets:
            out[dst] = _apply_shape(tuple(shapes[src]), op)
    return out


def canonical_tensors(tensors: dict) -> tuple[str, dict]:
    """(layout, tensors under BlinkDL names). Renames and transposes are views of the file's data."""
    layout, rules = plan(tensors)
    if layout in ("blinkdl", "unknown"):
        return layout, tensors
    out = {}
    for src, targets in rules.items():
        for dst, op in targets:
            out[dst] = _apply(tensors[src], op)
    return layout, out


def _apply_shape(shape: tuple[int, ...], op) -> tuple[int, ...]:
    if op is None:
        return shape
    if op == "t":
        return shape[::-1]
    if op == "vec":
        n = 1
        for d in shape:
            n *= d
        return (1, 1, n)
    return (1, 1, shape[-1])  # ("row", j)


def _apply(t, op):
    if op is None:
        return t
    if op == "t":
        return t.t()
    if op == "vec":
        return t.reshape(1, 1, -1)
    return t[op[1]].reshape(1, 1, -1)


# -- Hugging Face transformers RWKV-4, RWKV-5/6 remote code (§11.1, §11.2) -----------------------

_HF_RULES = [
    (re.compile(r"^embeddings\."), "emb."),
    (re.compile(r"^blocks\.0\.pre_ln\."), "blocks.0.ln0."),
    (re.compile(r"^(blocks\.\d+)\.attention\."), r"\1.att."),
    (re.compile(r"^(blocks\.\d+)\.feed_forward\."), r"\1.ffn."),
    # time_mix_key/value/receptance/gate -> time_mix_k/v/r/g
    (re.compile(r"\.time_mix_(k)ey$|\.time_mix_(v)alue$|\.time_mix_(r)eceptance$|\.time_mix_(g)ate$"),
     lambda m: ".time_mix_" + "".join(g for g in m.groups() if g)),
]


def _hf_name(name: str) -> str:
    if name == "head.weight":
        return name
    n = name.removeprefix("rwkv.")
    for pattern, repl in _HF_RULES:
        n = pattern.sub(repl, n)
    return n


# -- fla-hub RWKV-7 (§11.3) ----------------------------------------------------------------------

_FLA_TOP = {
    "model.embeddings.weight": "emb.weight",
    "model.norm.weight": "ln_out.weight",
    "model.norm.bias": "ln_out.bias",
    "lm_head.weight": "head.weight",
}
_FLA_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FLA_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}


def _fla_names(name: str) -> list:
    if name in _FLA_TOP:
        return [(_FLA_TOP[name], None)]
    m = _FLA_LAYER.match(name)
    if not m:
        return [(name, None)]  # unknown: validation lists it
    b, rest = f"blocks.{m.group(1)}.", m.group(2)
    if rest.startswith(("pre_norm.", "attn_norm.", "ffn_norm.")):
        part, _, leaf = rest.partition(".")
        return [(b + {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}[part] + "." + leaf, None)]
    if rest == "attn.x_x":  # legacy fused token-shift mixes [6, C]
        return [(b + f"att.x_{mix}", ("row", j)) for j, mix in enumerate(FLA_FUSED_MIX)]
    if mm := re.match(r"^attn\.x_([rwkvag])$", rest):
        return [(b + f"att.x_{mm.group(1)}", "vec")]
    if mm := re.match(r"^attn\.([wavg])_lora\.lora\.(0|2)\.weight$", rest):  # [out, in] -> [in, out]
        return [(b + f"att.{mm.group(1)}{1 if mm.group(2) == '0' else 2}", "t")]
    if mm := re.match(r"^attn\.([wav])_lora\.lora\.2\.bias$", rest):
        return [(b + f"att.{mm.group(1)}0", "vec")]
    if mm := re.match(r"^attn\.(r_proj|k_proj|v_proj|o_proj)\.weight$", rest):
        return [(b + f"att.{_FLA_PROJ[mm.group(1)]}.weight", None)]
    if rest in ("attn.k_k", "attn.k_a"):
        return [(b + "att." + rest[5:], "vec")]
    if rest == "attn.r_k":
        return [(b + "att.r_k", None)]
    if mm := re.match(r"^attn\.g_norm\.(weight|bias)$", rest):
        return [(b + f"att.ln_x.{mm.group(1)}", None)]
    if rest == "ffn.x_k":
        return [(b + "ffn.x_k", "vec")]
    if rest in ("ffn.key.weight", "ffn.value.weight"):
        return [(b + rest, None)]
    return [(name, None)]
