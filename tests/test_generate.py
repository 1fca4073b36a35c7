"""Sampling, stop strings, the Generation API, and greedy parity with the reference engine."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.generate import BatchRequest, Generation, StopMatcher, generate_batch
from rwkv_cli.sampling import Sampler, SamplingParams
from rwkv_cli.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def probs_to_logits(p):
    return torch.tensor(p, dtype=torch.float32).log().unsqueeze(0)


def draw_many(params, logits, n=400):
    seen = set()
    for seed in range(n):
        s = Sampler([SamplingParams(**{**params, "seed": seed, "presence_penalty": 0, "frequency_penalty": 0})], logits.shape[-1])
        seen.add(int(s.sample(logits)[0]))
    return seen


def test_top_p_keeps_the_nucleus_and_ties():
    logits = probs_to_logits([0.5, 0.2, 0.2, 0.05, 0.05])
    assert draw_many(dict(top_p=0.6), logits) == {0, 1, 2}  # 0.5 + 0.2 reaches 0.6; the tie at 0.2 survives
    assert draw_many(dict(top_p=0.4), logits) == {0}


def test_top_k_and_min_p():
    logits = probs_to_logits([0.4, 0.3, 0.2, 0.1])
    assert draw_many(dict(top_p=1.0, top_k=2), logits) == {0, 1}
    assert draw_many(dict(top_p=1.0, min_p=0.4), logits) == {0, 1, 2}  # p >= 0.16


def test_temperature_zero_is_greedy_and_bans_apply():
    logits = probs_to_logits([0.1, 0.6, 0.3])
    s = Sampler([SamplingParams(temperature=0, ban_tokens=(1,))], 3)
    assert int(s.sample(logits)[0]) == 2


def test_penalties_decay():
    s = Sampler([SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, penalty_decay=0.5)], 4)
    s.record(torch.tensor([2]))
    s.record(torch.tensor([2]))
    # count[2] = 1 * 0.5 + 1 = 1.5 -> penalty 0.5 + 1.5 * 0.25
    assert torch.allclose(s.penalized(torch.zeros(1, 4))[0], torch.tensor([0, 0, -0.875, 0]))


def test_per_row_parameters():
    logits = probs_to_logits([0.1, 0.6, 0.3]).repeat(2, 1)
    s = Sampler([SamplingParams(temperature=0), SamplingParams(temperature=0, ban_tokens=(1,))], 3)
    assert s.sample(logits).tolist() == [1, 2]


def test_draws_follow_the_distribution_after_temperature():
    """Inverse transform sampling: frequencies over 4,000 draws of one seeded sampler match p
    (T = 1) and p^(1/T) renormalised (T = 2), within 4 standard deviations."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for T in (1.0, 2.0):
        s = Sampler([SamplingParams(temperature=T, top_p=1.0, presence_penalty=0, frequency_penalty=0, seed=7)], 4)
        n = 4000
        counts = torch.bincount(torch.cat([s.sample(probs.log().unsqueeze(0)) for _ in range(n)]), minlength=4)
        want = probs ** (1 / T) / (probs ** (1 / T)).sum()
        sigma = (want * (1 - want) / n).sqrt()
        assert ((counts / n - want).abs() <= 4 * sigma).all(), (counts / n, want)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_rows_draw_as_they_would_alone(device):
    """Each row of a batched sampler (greedy, nucleus, top-k, min-p, temperatures; rows whose kept
    set exceeds the CPU's first candidate tiers) draws what a sampler of that row alone draws."""
    V = 6000
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0)) * torch.tensor([[3.0], [0.5], [0.01], [2.0], [1.0]])
    logits = logits.to(device)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=0, seed=2),
              SamplingParams(temperature=1.3, top_p=0.99, seed=3),  # a nearly flat row: kept set > 4096
              SamplingParams(temperature=1.0, top_p=1.0, top_k=5, seed=4), SamplingParams(temperature=1.0, min_p=0.2, seed=5)]
    together = Sampler(params, V, device=device)
    alone = [Sampler([p], V, device=device) for p in params]
    for _ in range(5):
        got = together.sample(logits).tolist()
        assert got == [a.sample(logits[b : b + 1]).item() for b, a in enumerate(alone)]


def test_invalid_parameters():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams().with_overrides(temprature=1.0)


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["\n\nUser:"])
    assert m.feed("Hello") == "Hello"
    assert m.feed("\n") == ""  # could start the stop string
    assert m.feed("\nUs") == ""
    assert m.feed("x") == "\n\nUsx"
    assert m.feed(" end\n\nUser: more") == " end" and m.stopped
    assert m.flush() == ""


@pytest.fixture(scope="module")
def world():
    return load_tokenizer("world")


@pytest.fixture(params=["4", "7"])
def world_model(request, make_ckpt):
    return load_model(make_ckpt(request.param, 3, 128, 65536), "cpu", "fp32")


def test_same_seed_same_output(world_model, world):
    ids = world.encode("Once upon a time")
    runs = [Generation(world_model, world, ids, SamplingParams(seed=42), max_tokens=12).run() for _ in range(2)]
    other = Generation(world_model, world, ids, SamplingParams(seed=43), max_tokens=12).run()
    assert runs[0] == runs[1] and runs[0] != other


def test_generation_state_continues_exactly(world_model, world):
    """Generating 6 then continuing from the saved state and logits gives the same 12 tokens."""
    ids = world.encode("One two three")
    full = Generation(world_model, world, ids, GREEDY, max_tokens=12, stop_at_eos=False)
    full.run()
    first = Generation(world_model, world, ids, GREEDY, max_tokens=6, stop_at_eos=False)
    first.run()
    rest = Generation(world_model, world, [], GREEDY, max_tokens=6, stop_at_eos=False, state=first.state, logits=first.logits)
    rest.run()
    assert first.tokens + rest.tokens == full.tokens


def test_batch_equals_one_by_one(world_model, world):
    prompts = ["Hello", "The quick brown fox", "1 2 3 4", "Zebra"]
    requests = [BatchRequest(world.encode(p), GREEDY, max_tokens=4 + 3 * i) for i, p in enumerate(prompts)]
    results = dict(generate_batch(world_model, world, requests, batch_size=3, stop_at_eos=False))
    for i, req in enumerate(requests):
        alone = Generation(world_model, world, req.prompt_ids, GREEDY, req.max_tokens, stop_at_eos=False)
        alone.run()
        assert results[i]["tokens"] == alone.tokens
        assert results[i]["finish_reason"] == "length"


@pytest.mark.parametrize("version", ["4", "7"])
def test_greedy_matches_reference_engine(version, make_ckpt, world, tmp_path):
    """Greedy decoding (penalties off) equals the reference's argmax loop, token for token."""
    pytest.importorskip("rwkv")
    from rwkv_cli.testing import run_reference

    path = make_ckpt(version, 3, 128, 65536)
    ids = world.encode("In a distant galaxy, a small robot")
    (ref,) = run_reference(version, [{"checkpoint": str(path), "prompt": ids, "steps": [], "greedy": 40}], tmp_path)
    gen = Generation(load_model(path, "cpu", "fp32"), world, ids, GREEDY, max_tokens=40, stop_at_eos=False)
    gen.run()
    assert gen.tokens == ref["greedy.tokens"].tolist()


@pytest.mark.parametrize("version", ["4", "7"])
def test_temperature_zero_matches_reference_pipeline(version, make_ckpt, world, tmp_path):
    """`--temp 0` with the default penalties samples what BlinkDL's PIPELINE.generate does at
    temperature 0 with its defaults (presence/frequency 0.2, decay 0.996, spaces/digits uncounted)."""
    pytest.importorskip("rwkv")
    from rwkv_cli.sampling import GENERATE_DEFAULTS
    from rwkv_cli.testing import run_reference

    path = make_ckpt(version, 3, 128, 65536)
    ctx = "Numbers: 1 2 3, and then"
    job = {"checkpoint": str(path), "prompt": [1], "steps": [], "pipeline": {"ctx": ctx, "tokens": 40, "temperature": 0}}
    (ref,) = run_reference(version, [job], tmp_path)
    params = SamplingParams(**GENERATE_DEFAULTS).with_overrides(temperature=0)
    gen = Generation(load_model(path, "cpu", "fp32"), world, world.encode(ctx), params, max_tokens=40, stop_at_eos=False)
    gen.run()
    assert gen.tokens == ref["pipeline.tokens"].tolist()


def test_non_finite_logits_stop_generation_with_an_error(world_model, world):
    from rwkv_cli.errors import NonFiniteError

    nan = torch.full((1, world_model.cfg.vocab_size), float("nan"))
    gen = Generation(world_model, world, [], GREEDY, max_tokens=3, state=world_model.zero_state(), logits=nan)
    with pytest.raises(NonFiniteError, match="non-finite"):
        gen.run()


def stepwise_greedy(model, logits, state, n):
    """The plain loop DecodeLoop must equal: argmax on the host, then the next step."""
    out = []
    for _ in range(n):
        ids = logits.argmax(-1).tolist()
        logits, state = model.forward([[i] for i in ids], state)
        out.append((ids, logits, state))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", ["4", "7"])
def test_decode_loop_equals_step_by_step_and_select_keeps_rows(make_ckpt, version, device):
    """DecodeLoop (the next step queued before the ids are read back) yields the ids, logits and
    states of the plain step-by-step loop, exactly (same steps, same inputs); after `select` the
    kept rows go on as they would have."""
    from rwkv_cli.decoding import DecodeLoop

    model = load_model(make_ckpt(version, 3, 128, 1024), device, "fp32")
    logits, state = model.forward(torch.randint(0, 1024, (3, 9), generator=torch.Generator().manual_seed(0)))
    loop = DecodeLoop(model, Sampler([GREEDY] * 3, 1024, device=logits.device), logits, state)
    for ids_ref, logits_ref, state_ref in stepwise_greedy(model, logits, state, 5):
        ids, logits_out, state_out = next(loop)
        assert ids == ids_ref
        assert torch.equal(logits_out, logits_ref)
        for a, b in zip(state_out.tensors(), state_ref.tensors(), strict=True):
            assert torch.equal(a, b)
    loop.select([2, 0])
    (ids_ref, logits_ref, _), = stepwise_greedy(model, logits_ref[[2, 0]], state_ref.select(torch.tensor([2, 0])), 1)
    ids, logits_out, _ = next(loop)
    assert ids == ids_ref and torch.equal(logits_out, logits_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_end_of_text_leaves_the_state_after_the_last_token_shown(make_ckpt, world, device):
    """The step queued for the end-of-text token is not taken: the Generation's state and logits
    are those after its last generated token, as if the loop had not run ahead."""
    model = load_model(make_ckpt("7", 3, 128, 65536), device, "fp32")
    ids = world.encode("A story about")
    probe = Generation(model, world, ids, GREEDY, max_tokens=16, stop_at_eos=False)
    probe.run()
    stop = next(i for i in range(3, 16) if probe.tokens[i] not in probe.tokens[:i])

    class EosAt:  # the world tokenizer, with end-of-text moved to a token the model will draw
        eos_id = probe.tokens[stop]

        def __getattr__(self, name):
            return getattr(world, name)

    gen = Generation(model, EosAt(), ids, GREEDY, max_tokens=16)
    gen.run()
    assert gen.tokens == probe.tokens[:stop] and gen.finish_reason == "stop"
    logits, state = model.forward([ids + probe.tokens[:stop]])
    assert torch.allclose(gen.logits, logits, atol=1e-4)
    for a, b in zip(gen.state.tensors(), state.tensors(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_sampling_kernels_draw_as_the_torch_path(monkeypatch):
    """kernels/sampling.cu (penalties + softmax, truncation + temperature + draw + count update)
    against the Sampler's PyTorch code on the same GPU, same seeds: the same tokens over 12 steps
    for every kind of row, and the same penalty counts. The rows' kept sets are small: on a flat
    distribution the two softmaxes' last-bit differences reorder near-equal probabilities in the
    sort, and a draw there may pick a different (equally likely) token; tests/test_cuda_kernels.py
    checks the draw kernel on such rows from the same sorted input."""
    from rwkv_cli import sampling

    V = 65536
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=0, seed=2),
              SamplingParams(temperature=1.3, top_p=0.99, presence_penalty=0.7, seed=3),
              SamplingParams(temperature=1.0, top_p=1.0, top_k=5, seed=4, ban_tokens=(1, 2, 3)),
              SamplingParams(temperature=1.0, min_p=0.2, frequency_penalty=0.9, seed=5),
              SamplingParams(temperature=2.0, top_p=0.5, presence_penalty=0, frequency_penalty=0, seed=6)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = torch.tensor([[8.0], [0.5], [9.0], [2.0], [3.0], [6.0]], device="cuda")
    fused, plain = Sampler(params, V, device="cuda"), Sampler(params, V, device="cuda")
    assert sampling._kernels(torch.zeros(1, device="cuda")) is not None
    for _ in range(12):
        logits = torch.randn(len(params), V, device="cuda", generator=gen) * scale
        got = fused.sample(logits).tolist()
        with monkeypatch.context() as m:
            m.setattr(sampling, "_kernels", lambda logits: None)
            want = plain.sample(logits).tolist()
        assert got == want
    assert torch.allclose(fused.counts, plain.counts) and torch.equal(fused.seen, plain.seen)
