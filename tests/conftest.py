"""Shared fixtures: small random checkpoints in BlinkDL .pth layout, and the reference's outputs on them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network

# Parity shapes: >= 3 layers, head size 64, several heads for RWKV-7 (the minimum), small
# vocabularies to keep the suite fast. (version, layers, width, vocab)
PARITY_SHAPES = [("7", 3, 128, 1024), ("7", 4, 256, 2048), ("4", 3, 128, 1024), ("4", 4, 192, 2048)]
PROMPT_LEN, STEPS = 64, 32


def shape_id(shape) -> str:
    version, layers, width, vocab = shape
    return f"v{version}-L{layers}-C{width}"


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_ckpt(ckpt_dir):
    """make_ckpt(version, layers, width, vocab, **kw) -> path of a cached random .pth checkpoint."""
    from rwkv_cli.testing import random_checkpoint

    cache = {}

    def make(version, n_layer, n_embd, vocab_size, suffix=".pth", **kwargs):
        key = (version, n_layer, n_embd, vocab_size, suffix, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = f"v{version}-L{n_layer}-C{n_embd}-V{vocab_size}-{len(cache)}{suffix}"
            cache[key] = random_checkpoint(ckpt_dir / name, version, n_layer, n_embd, vocab_size=vocab_size, **kwargs)
        return cache[key]

    return make


def parity_tokens(vocab_size: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    steps = torch.randint(0, vocab_size, (STEPS,), generator=gen).tolist()
    return prompt, steps


@pytest.fixture(scope="session")
def reference_outputs(make_ckpt, tmp_path_factory):
    """{shape: reference outputs} for every PARITY_SHAPES entry; one child process per version."""
    pytest.importorskip("rwkv", reason="the reference engine (rwkv==0.8.32) is a test dependency")
    from rwkv_cli.testing import run_reference

    work = tmp_path_factory.mktemp("reference")
    results = {}
    for version in ("4", "7"):
        shapes = [s for s in PARITY_SHAPES if s[0] == version]
        jobs = []
        for shape in shapes:
            prompt, steps = parity_tokens(shape[3])
            jobs.append({"checkpoint": str(make_ckpt(*shape)), "prompt": prompt, "steps": steps})
        for shape, out in zip(shapes, run_reference(version, jobs, work)):
            results[shape] = out
    return results


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-4):
    """The issue's bar: max |ours - ref| <= rel * max(1, max |ref|)."""
    ours, ref = ours.float().reshape(ref.shape), ref.float()
    err = float((ours - ref).abs().max())
    bound = rel * max(1.0, float(ref.abs().max()))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


@pytest.fixture(params=["numpy", "torch"])
def matmul_backend(request):
    """Both CPU paths: NumPy's BLAS with the NumPy decoding step, and plain torch (its twin)."""
    from rwkv_cli.ops import cpu_matmul_backend, set_cpu_matmul_backend

    before = cpu_matmul_backend()
    set_cpu_matmul_backend(request.param)
    yield request.param
    set_cpu_matmul_backend(before)


def check_prompt_then_steps(model, ref: dict, version: str, vocab_size: int) -> None:
    """The parity bar: logits and every state tensor against the reference's, after the
    64-token prompt and after 32 single steps (`parity_tokens`)."""
    from rwkv_cli.testing import reference_state_as_dict

    prompt, steps = parity_tokens(vocab_size)
    logits, state = model.forward([prompt])
    assert_close_to_reference(logits[0], ref["prompt.logits"], "prompt logits")
    ref_state = reference_state_as_dict(ref, "prompt", version)
    assert set(state.to_dict()) == set(ref_state)
    for name, tensor in state.to_dict().items():
        assert_close_to_reference(tensor, ref_state[name], f"prompt state {name}")
    step_logits = []
    for token in steps:
        logits, state = model.forward([[token]], state)
        step_logits.append(logits[0])
    assert_close_to_reference(torch.stack(step_logits), ref["steps.logits"], "step logits")
    ref_state = reference_state_as_dict(ref, "steps", version)
    for name, tensor in state.to_dict().items():
        assert_close_to_reference(tensor, ref_state[name], f"state after steps {name}")
