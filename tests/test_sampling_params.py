"""SamplingParams validation (values from flags, --batch lines, /set and state files) and the
Sampler's edges: non-finite and mistyped values, banned ids outside the vocabulary, tiny
temperatures and huge top-k."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rwkv_cli.cli import app
from rwkv_cli.errors import RWKVError
from rwkv_cli.sampling import Sampler, SamplingParams

from .conftest import run_cli

FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "penalty_decay"]
V = 65536


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused_by_name(name, value):
    message = f"^{name} must be a finite number, got {value}$"
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=message):
        SamplingParams().with_overrides(**{name: value})


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
        (dict(top_p=True), "top_p must be a number, got True"),
        (dict(presence_penalty=[1]), r"presence_penalty must be a number, got \[1\]"),
        (dict(seed="x"), "seed must be an integer or None, got 'x'"),
        (dict(seed=1.5), "seed must be an integer or None, got 1.5"),
        (dict(seed=True), "seed must be an integer or None, got True"),
        (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
        (dict(top_k=False), "top_k must be an integer, got False"),
        (dict(ban_tokens=5), "ban_tokens must be a list of token ids, got 5"),
        (dict(ban_tokens="x"), "ban_tokens must be a list of token ids, got 'x'"),
        (dict(ban_tokens=("x",)), "ban_tokens must hold integer token ids, got 'x'"),
        (dict(ban_tokens=[1, True]), "ban_tokens must hold integer token ids, got True"),
        (dict(ban_tokens=[1.0]), "ban_tokens must hold integer token ids, got 1.0"),
        (dict(ban_tokens=[3, -1]), "ban_tokens must hold token ids >= 0, got -1"),
        (dict(temperature=1e31), "temperature must be at most 1e30"),
        (dict(presence_penalty=-3e38), r"presence_penalty must lie in \[-1e30, 1e30\]"),
        (dict(frequency_penalty=1e31), r"frequency_penalty must lie in \[-1e30, 1e30\]"),
    ],
)
def test_wrong_types_and_values_are_refused_by_name(given, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingParams(**given)
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingParams().with_overrides(**given)


def test_errors_are_rwkv_errors_too():
    """A command that does not turn them into usage errors still shows them as one line."""
    with pytest.raises(RWKVError):
        SamplingParams(temperature="hot")


def test_accepted_values_are_normalised():
    import numpy as np

    p = SamplingParams(temperature=0, top_p=1, seed=np.int64(3), top_k=np.int32(5), min_p=np.float32(0.25),
                       ban_tokens=[2, np.int64(7)])
    assert p.ban_tokens == (2, 7) and type(p.seed) is int and type(p.top_k) is int and type(p.min_p) is float
    assert SamplingParams(ban_tokens=range(3)).ban_tokens == (0, 1, 2)
    assert SamplingParams(seed=None).seed is None
    assert SamplingParams().with_overrides(ban_tokens=[1]).ban_tokens == (1,)


def test_banned_ids_must_lie_in_the_vocabulary():
    Sampler([SamplingParams(ban_tokens=(V - 1,))], V)
    with pytest.raises(ValueError, match=r"^token id 9999999 is outside the vocabulary \[0, 65536\)$"):
        Sampler([SamplingParams(), SamplingParams(ban_tokens=(3, 9999999))], V)
    with pytest.raises(ValueError, match=r"^token id 65536 is outside"):
        SamplingParams(ban_tokens=(65536,)).check_vocab(V)


@pytest.mark.parametrize("temperature", [0.01, 1e-10, 1e-300])
def test_tiny_temperatures_take_the_most_likely_token(temperature):
    """p^(1/T) underflows to 0 in float32 for every kept token of a flat distribution."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    s = Sampler([SamplingParams(temperature=temperature, seed=1)] * 3, V)
    assert s.sample(logits).tolist() == logits.argmax(-1).tolist()


def test_huge_top_k_keeps_everything():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    draws = [Sampler([SamplingParams(top_k=k, seed=2)], V).sample(logits).item() for k in (10**30, V, 0)]
    assert draws[0] == draws[1] == draws[2]


def test_largest_penalties_still_sample():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    for sign in (1, -1):
        big = sign * 1e30
        params = SamplingParams(presence_penalty=big, frequency_penalty=big, penalty_decay=1.0, seed=3)
        s = Sampler([params], V)
        for _ in range(5):
            assert 0 <= s.sample(logits).item() < V


# ------------------------------------------------------------------------------ the commands


@pytest.fixture(scope="module")
def model(make_ckpt):
    return str(make_ckpt("7", 2, 64, V))


def test_non_finite_flag_is_one_usage_line(model):
    r = run_cli("generate", "-m", model, "hi", "-n", "2", "--presence-penalty", "nan")
    assert r.returncode == 2 and b"Traceback" not in r.stderr and r.stderr.count(b"\n") == 1
    assert b"presence_penalty must be a finite number, got nan" in r.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--presence-penalty", "-inf", "presence_penalty must be a finite number, got -inf"),
        ("--frequency-penalty", "nan", "frequency_penalty must be a finite number, got nan"),
        ("--frequency-penalty", "-inf", "frequency_penalty must be a finite number, got -inf"),
        ("--temp", "nan", "temperature must be a finite number, got nan"),
        ("--ban-token", "-1", "ban_tokens must hold token ids >= 0, got -1"),
    ],
)
def test_bad_sampling_flags_are_usage_errors(model, flag, value, message):
    r = CliRunner().invoke(app, ["generate", "-m", model, "hi", "-n", "2", flag, value])
    assert r.exit_code == 2 and message in r.output


def test_banned_id_past_the_vocabulary_is_one_line(model):
    r = run_cli("generate", "-m", model, "hi", "-n", "2", "-q", "--ban-token", "9999999")
    assert r.returncode != 0 and b"Traceback" not in r.stderr and r.stderr.count(b"\n") == 1
    assert b"token id 9999999 is outside the vocabulary [0, 65536)" in r.stderr


def test_batch_lines_with_bad_sampling_values_get_error_lines(model, tmp_path):
    lines = [
        {"prompt": "a", "temperature": "hot"},
        {"prompt": "b", "presence_penalty": math.nan},  # Python's json reads NaN
        {"prompt": "c", "seed": 1.5},
        {"prompt": "d", "ban_tokens": "x"},
        {"prompt": "e", "top_k": True},
        {"prompt": "f", "temperature": 0, "seed": 4},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = CliRunner().invoke(app, ["generate", "-m", model, "--batch", str(path), "-n", "2", "-q"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows[0]["error"] == "temperature must be a number, got 'hot'"
    assert rows[1]["error"] == "presence_penalty must be a finite number, got nan"
    assert rows[2]["error"] == "seed must be an integer or None, got 1.5"
    assert "ban_tokens" in rows[3]["error"]
    assert rows[4]["error"] == "top_k must be an integer, got True"
    assert "error" not in rows[5] and len(rows[5]["tokens"]) == 2
