"""Our parallel (sequence) mode equals our step-by-step RNN mode, for every chunking."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.wkv import wkv4_sequence, wkv4_step, wkv7_sequence, wkv7_step

from .conftest import (
    assert_close_to_reference,
    check_batch_rows_independent,
    check_sequence_equals_steps,
)

SHAPES = {"7": ("7", 3, 128, 512), "4": ("4", 3, 128, 512)}


@pytest.mark.parametrize("version", ["4", "7"])
@pytest.mark.parametrize("length", [1, 2, 13, 64, 100])
@pytest.mark.parametrize("chunk", [1, 16, 64, 256])
def test_sequence_equals_steps(version, length, chunk, make_ckpt):
    model = load_model(make_ckpt(*SHAPES[version]), "cpu", "fp32")
    model.prefill_chunk = chunk
    tokens = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(length))
    check_sequence_equals_steps(model, tokens)


@pytest.mark.parametrize("version", ["4", "7"])
def test_batch_rows_are_independent(version, make_ckpt):
    """Three sequences in one batch give what each gives alone."""
    check_batch_rows_independent(load_model(make_ckpt(*SHAPES[version]), "cpu", "fp32"))


def _wkv7_inputs_and_steps(T: int, seed: int):
    """Random RWKV-7 recurrence inputs (B = 2, H = 3, N = 64) from a non-zero state (fla #351's
    failure case), decays over the full range RWKV-7 allows and head 0 at the strongest decay
    throughout (1 / D reaches 1.6e4 in a 16-token chunk), and their token-by-token result:
    ((S0, r, log_decay, k, v, kk, a), outputs [B, T, H, N], final state)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, N = 2, 3, 64
    S0 = torch.randn(B, H, N, N, generator=gen)
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
    a = torch.rand(B, T, H, N, generator=gen)
    log_decay = -0.6065 * torch.rand(B, T, H, N, generator=gen)
    log_decay[:, :, 0] = -0.6065
    S, outs = S0, []
    for t in range(T):
        o, S = wkv7_step(S, r[:, t], log_decay[:, t], k[:, t], v[:, t], kk[:, t], a[:, t])
        outs.append(o)
    return (S0, r, log_decay, k, v, kk, a), torch.stack(outs, 1), S


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_wkv7_chunked_equals_steps_with_initial_state(chunk):
    """The chunked delta-rule solve, from a non-zero state, strong decays included."""
    inputs, outs, S = _wkv7_inputs_and_steps(150, chunk)
    o_seq, S_seq = wkv7_sequence(*inputs, chunk=chunk)
    assert_close_to_reference(o_seq, outs, "outputs")
    assert_close_to_reference(S_seq, S, "final state")


@pytest.mark.parametrize("T", [1, 15, 16, 17, 150])
def test_gpu_chunk_split_twins_equal_steps(T):
    """The GPU kernels' split of the recurrence (`twins.wkv7_chunk_mats`: every chunk's factors,
    `twins.wkv7_chunk`: the state carried through them) equals token-by-token steps."""
    from rwkv_cli.cuda import twins

    (S0, r, log_decay, k, v, kk, a), outs, S = _wkv7_inputs_and_steps(T, T)
    B, H = r.shape[0], r.shape[2]
    rows = lambda x: x.reshape(B, T, -1)  # noqa: E731
    Q, W, VB, mats = twins.wkv7_chunk_mats(rows(r), rows(log_decay.exp()), rows(kk), rows(k), rows(kk * a), H)
    y, S_split = twins.wkv7_chunk(Q, W, VB, rows(v), mats, S0)
    assert_close_to_reference(y.view_as(outs), outs, "outputs")
    assert_close_to_reference(S_split, S, "final state")


def test_wkv4_scan_equals_steps_with_extreme_decays():
    """The log-depth scan keeps the running-max rescaling: decays from e^-5 to e^5 per step."""
    gen = torch.Generator().manual_seed(0)
    B, T, A = 2, 300, 64
    w = -torch.exp(torch.linspace(-5, 5, A))
    u = torch.randn(A, generator=gen)
    k, v = torch.randn(B, T, A, generator=gen) * 5, torch.randn(B, T, A, generator=gen)
    state = (torch.randn(B, A, generator=gen), torch.rand(B, A, generator=gen) + 0.1, torch.randn(B, A, generator=gen))
    _check_wkv4_sequence_equals_steps(w, u, k, v, state)


def _check_wkv4_sequence_equals_steps(w, u, k, v, state) -> None:
    """wkv4_sequence against wkv4_step token by token: outputs and the final (num, den, max)."""
    num, den, mx = state
    outs = []
    for t in range(k.shape[1]):
        y, num, den, mx = wkv4_step(w, u, k[:, t], v[:, t], num, den, mx)
        outs.append(y)
    y_seq, *final = wkv4_sequence(w, u, k, v, *state)
    assert torch.isfinite(y_seq).all()
    assert_close_to_reference(y_seq, torch.stack(outs, 1), "outputs")
    for got, want, name in zip(final, (num, den, mx), ("num", "den", "max"), strict=True):
        assert_close_to_reference(got, want, name)


@pytest.mark.parametrize("length", [1, 2, 3, 64, 65])
def test_wkv4_sequence_from_empty_state(length):
    """The carried state is folded into token 0 before the scan: from the engine's empty state
    (max -1e30) and at the power-of-two edges of the scan length, sequence mode equals steps."""
    gen = torch.Generator().manual_seed(length)
    B, A = 2, 16
    w, u = -torch.exp(torch.randn(A, generator=gen)), torch.randn(A, generator=gen)
    k, v = torch.randn(B, length, A, generator=gen), torch.randn(B, length, A, generator=gen)
    _check_wkv4_sequence_equals_steps(w, u, k, v, (torch.zeros(B, A), torch.zeros(B, A), torch.full((B, A), -1e30)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wkv7_sequence_takes_half_inputs(dtype):
    """Half-precision activations (the PyTorch GPU paths) are computed in fp32: same result as
    the fp32 call on the same rounded values, output and state fp32."""
    gen = torch.Generator().manual_seed(7)
    B, T, H, N = 1, 40, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=gen).to(dtype) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1).to(dtype)
    a = torch.rand(B, T, H, N, generator=gen).to(dtype)
    log_decay = -0.6065 * torch.rand(B, T, H, N, generator=gen)
    S0 = torch.randn(B, H, N, N, generator=gen)
    o, S = wkv7_sequence(S0, r, log_decay, k, v, kk, a)
    o_ref, S_ref = wkv7_sequence(S0, *(t.float() for t in (r, log_decay, k, v, kk, a)))
    assert o.dtype == S.dtype == torch.float32 and o.shape == (B, T, H, N)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=0)
