"""RWKV-5.0, 5.1, 5.2 and RWKV-6: detection, parity with BlinkDL's `rwkv` 0.8.32 (fp32, CPU), our
sequence mode against our step mode, the chunked WKV forms, bf16/fp16 against fp32, state files.

The parity bar is the engine's: logits and every state tensor within 1e-4 x max(1, max |ref|)
after a 64-token prompt and after 32 single steps. All reference jobs run in one child process
(the legacy class runs every v5/v6 variant with RWKV_V7_ON unset).
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.checkpoint import load_checkpoint
from rwkv_cli.config import infer_config
from rwkv_cli.errors import CheckpointError
from rwkv_cli.testing import random_state_dict, reference_state_as_dict, write_checkpoint
from rwkv_cli.wkv56 import _SAFE_RANGE, wkv5_sequence, wkv5_step, wkv6_sequence

from .conftest import (
    assert_close_to_reference,
    check_batch_rows_independent,
    check_deep_fp16,
    check_half_precision,
    check_prompt_then_steps,
    check_sequence_equals_steps,
    parity_tokens,
    shape_id,
)

# (version, layers, width, vocab): >= 3 layers, head size 64, several heads; two shapes for 5.2, 6
SHAPES56 = [
    ("5.0", 3, 128, 1024), ("5.1", 3, 128, 1024),
    ("5.2", 3, 128, 1024), ("5.2", 4, 256, 2048),
    ("6", 3, 128, 1024), ("6", 4, 256, 2048),
]


@pytest.fixture(scope="session")
def reference56(make_ckpt, tmp_path_factory):
    pytest.importorskip("rwkv", reason="the reference engine (rwkv==0.8.32) is a test dependency")
    from rwkv_cli.testing import run_reference

    jobs = []
    for shape in SHAPES56:
        prompt, steps = parity_tokens(shape[3])
        jobs.append({"checkpoint": str(make_ckpt(*shape)), "prompt": prompt, "steps": steps})
    tuned = tuned_checkpoint(tmp_path_factory.mktemp("tuned"))
    jobs.append({"checkpoint": str(tuned), "prompt": parity_tokens(1024)[0], "steps": []})
    outs = run_reference("5", jobs, tmp_path_factory.mktemp("reference56"))
    return {**dict(zip(SHAPES56, outs[:-1], strict=True)), "tuned": (tuned, outs[-1])}


def tuned_checkpoint(folder):
    """A v6 model file with an embedded state-tuned `time_state` [H, N, N] per layer, which the
    reference's legacy class takes as its initial state (transposed, §12)."""
    sd = random_state_dict("6", 3, 128, vocab_size=1024, seed=7)
    gen = torch.Generator().manual_seed(8)
    for i in range(3):
        sd[f"blocks.{i}.att.time_state"] = torch.randn(2, 64, 64, generator=gen).to(torch.bfloat16)
    return write_checkpoint(folder / "v6-tuned.pth", sd)




@pytest.mark.parametrize("shape", SHAPES56, ids=shape_id)
def test_prompt_then_steps_match_reference(shape, make_ckpt, reference56, matmul_backend):
    version, ref = shape[0], reference56[shape]
    model = load_model(make_ckpt(*shape), device="cpu", dtype="fp32")
    assert model.cfg.version == version
    check_prompt_then_steps(model, ref, version, shape[3])


# -- detection and config -------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["5.0", "5.1", "5.2", "6"])
def test_version_and_sizes_from_shapes(version):
    shapes = {k: tuple(v.shape) for k, v in random_state_dict(version, 2, 256, vocab_size=300).items()}
    cfg = infer_config(shapes)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (version, 2, 256, 300)
    assert (cfg.n_head, cfg.head_size, cfg.dim_att) == (4, 64, 256)
    assert cfg.ffn_dim == 896  # 3.5 C, a multiple of 32
    assert cfg.lora == ({"mix": 32, "decay": 64} if version == "6" else {})


def test_per_head_decay_may_be_stored_as_column(tmp_path):
    """v5.0/5.1 per-head vectors as [H] or [H, 1] are the same parameter."""
    sd = random_state_dict("5.1", 3, 128, vocab_size=64, dtype=torch.float32)
    col = {k: (v.view(-1, 1) if k.endswith(("time_decay", "time_faaaa")) else v) for k, v in sd.items()}
    a, _ = load_model(write_checkpoint(tmp_path / "a.pth", sd), "cpu", "fp32").forward([[1, 2, 3]])
    b, _ = load_model(write_checkpoint(tmp_path / "b.pth", col), "cpu", "fp32").forward([[1, 2, 3]])
    assert torch.equal(a, b)


def test_time_first_is_exponentiated_and_time_faaaa_raw(tmp_path):
    """§3: a bonus named time_faaaa is used as is, one named time_first as exp(time_first)."""
    sd = random_state_dict("5.2", 3, 128, vocab_size=64, dtype=torch.float32)
    for i in range(3):
        sd[f"blocks.{i}.att.time_faaaa"] = sd[f"blocks.{i}.att.time_faaaa"].abs() + 0.01
    first = {k.replace("time_faaaa", "time_first"): (v.log() if "faaaa" in k else v) for k, v in sd.items()}
    a, _ = load_model(write_checkpoint(tmp_path / "a.pth", sd), "cpu", "fp32").forward([[1, 2, 3]])
    b, _ = load_model(write_checkpoint(tmp_path / "b.pth", first), "cpu", "fp32").forward([[1, 2, 3]])
    assert_close_to_reference(b, a, "logits", rel=1e-5)


def test_missing_and_misshaped_v6_tensors_are_listed(tmp_path):
    sd = random_state_dict("6", 2, 128, vocab_size=64)
    del sd["blocks.1.att.time_maa_g"]
    sd["blocks.0.att.time_decay_w2"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(write_checkpoint(tmp_path / "m.pth", sd))
    assert "blocks.1.att.time_maa_g" in str(err.value) and "time_decay_w2 [64, 64]" in str(err.value)


# -- sequence mode == step mode ---------------------------------------------------------------------

SEQ_SHAPES = {v: (v, 3, 128, 512) for v in ("5.0", "5.1", "5.2", "6")}
_stepwise_cache: dict = {}


def stepwise(model, tokens, key):
    """Per-position logits [B, T, V] and the final state, one token at a time (cached per key)."""
    if key not in _stepwise_cache:
        state, outs = None, []
        for t in range(tokens.shape[1]):
            logits, state = model.forward(tokens[:, t : t + 1], state)
            outs.append(logits)
        _stepwise_cache[key] = torch.stack(outs, 1), state
    return _stepwise_cache[key]


@pytest.mark.parametrize("version", list(SEQ_SHAPES))
@pytest.mark.parametrize("length", [1, 13, 100])
@pytest.mark.parametrize("chunk", [1, 16, 64, 256])
def test_sequence_equals_steps(version, length, chunk, make_ckpt):
    model = load_model(make_ckpt(*SEQ_SHAPES[version]), "cpu", "fp32")
    model.prefill_chunk = chunk
    tokens = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(length))
    check_sequence_equals_steps(model, tokens, stepwise(model, tokens, (version, length)))


@pytest.mark.parametrize("version", ["5.0", "6"])
def test_batch_rows_are_independent(version, make_ckpt):
    check_batch_rows_independent(load_model(make_ckpt(*SEQ_SHAPES[version]), "cpu", "fp32"))


def _wkv_inputs(seed, B=2, T=150, H=3, N=64):
    gen = torch.Generator().manual_seed(seed)
    S0 = torch.randn(B, H, N, N, generator=gen)
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    u = 0.3 * torch.randn(H, N, generator=gen)
    return gen, S0, r, k, v, u


def _steps(S, r, k, v, log_w, u):
    outs = []
    for t in range(r.shape[1]):
        y, S = wkv5_step(S, r[:, t], k[:, t], v[:, t], log_w[:, t] if log_w.dim() == 4 else log_w, u)
        outs.append(y)
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("chunk", [1, 5, 16, 32, 64])
@pytest.mark.parametrize("decays", ["moderate", "extreme"])
def test_wkv6_chunked_equals_steps(chunk, decays):
    """Per-channel data-dependent decays, from a non-zero state, lengths not divisible by the chunk.
    'extreme' includes channels that forget everything in a token (log w down to -e^5), which takes
    the exact pairwise path inside chunks; 'moderate' stays on the factored one."""
    gen, S0, r, k, v, u = _wkv_inputs(chunk)
    spread = (-8.0, 0.0) if decays == "moderate" else (-8.0, 5.0)
    d = torch.empty(r.shape).uniform_(*spread, generator=gen)
    log_w = -torch.exp(d)
    if decays == "extreme" and chunk > 1:  # some chunks must take the exact pairwise path
        whole = log_w[:, : 150 // chunk * chunk].unflatten(1, (-1, chunk)).sum(2)
        assert float(whole.min()) < -_SAFE_RANGE
    y_ref, S_ref = _steps(S0, r, k, v, log_w, u)
    y, S = wkv6_sequence(S0, r, k, v, log_w, u, chunk=chunk, block=64)
    assert torch.isfinite(y).all()
    assert_close_to_reference(y, y_ref, "outputs")
    assert_close_to_reference(S, S_ref, "final state")


@pytest.mark.parametrize("chunk", [1, 7, 64, 128])
def test_wkv5_parallel_form_equals_steps(chunk):
    """One decay per head (v5.0/5.1): the exact parallel form, strong and weak heads together."""
    gen, S0, r, k, v, u = _wkv_inputs(100 + chunk)
    log_w = -torch.exp(torch.tensor([-6.0, 0.0, 3.0]))
    y_ref, S_ref = _steps(S0, r, k, v, log_w.view(3, 1), u)
    y, S = wkv5_sequence(S0, r, k, v, log_w, u, chunk=chunk)
    assert_close_to_reference(y, y_ref, "outputs")
    assert_close_to_reference(S, S_ref, "final state")


# -- half precision -------------------------------------------------------------------------------

# The tolerances of tests/test_dtypes.py (measured errors on these models are well inside them).


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("version", ["5.0", "5.2", "6"])
def test_half_precision_matches_fp32(version, dtype, make_ckpt):
    check_half_precision(make_ckpt(version, 4, 256, 1024), dtype, 1024)


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_deep_fp16_does_not_overflow(version, tmp_path):
    check_deep_fp16(version, tmp_path)


# -- states ---------------------------------------------------------------------------------------

def test_tuned_state_matches_reference(reference56):
    """The reference starts from a model file's embedded time_state: so do we, and loading the same
    tensors as a state-tuned file (`load_tuned_state`) gives the same logits and states."""
    from rwkv_cli.statefile import load_tuned_state

    path, ref = reference56["tuned"]
    model = load_model(path, "cpu", "fp32")
    prompt, _ = parity_tokens(1024)
    ref_state = reference_state_as_dict(ref, "prompt", "6")
    # the model file's embedded time_state is its initial state (as the reference does), and
    # the same tensors loaded as a state-tuned file give the same start
    for initial in (None, load_tuned_state(path, model)):
        logits, state = model.forward([prompt], initial)
        assert_close_to_reference(logits[0], ref["prompt.logits"], "prompt logits")
        for name, tensor in state.to_dict().items():
            assert_close_to_reference(tensor, ref_state[name], f"prompt state {name}")
    assert torch.equal(model.zero_state(2).layers[1].wkv[1], load_tuned_state(path, model).layers[1].wkv[0])


def test_state_file_round_trip_and_tuned_state_transpose(make_ckpt, tmp_path):
    from rwkv_cli.statefile import load_state, load_tuned_state, save_state

    model = load_model(make_ckpt("6", 3, 128, 1024), "cpu", "fp32")
    logits, state = model.forward([[5, 6, 7]])
    saved = load_state(save_state(tmp_path / "s.rwkvstate", state, model, logits=logits), model)
    for name, tensor in state.to_dict().items():
        assert torch.equal(saved.state.to_dict()[name], tensor)
    # a state-tuned file stores [H, value, key]; v5/v6 run on [H, key, value] (§12)
    tuned = {f"blocks.{i}.att.time_state": torch.randn(2, 64, 64) for i in range(3)}
    initial = load_tuned_state(write_checkpoint(tmp_path / "tuned.pth", tuned), model)
    assert torch.equal(initial.layers[2].wkv[0], tuned["blocks.2.att.time_state"].transpose(1, 2))
    assert torch.count_nonzero(initial.layers[0].att_shift) == 0
