"""Shared fixtures: small random checkpoints in BlinkDL .pth layout, and the reference's outputs on them."""

from __future__ import annotations

import os
from contextlib import contextmanager

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
        for shape, out in zip(shapes, run_reference(version, jobs, work), strict=False):
            results[shape] = out
    return results


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-4):
    """The issue's bar: max |ours - ref| <= rel * max(1, max |ref|)."""
    ours, ref = ours.float().reshape(ref.shape), ref.float()
    err = float((ours - ref).abs().max())
    bound = rel * max(1.0, float(ref.abs().max()))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


@contextmanager
def cpu_matmul(name: str):
    """Run the block with CPU products through backend `name` (see `rwkv_cli.ops`)."""
    from rwkv_cli.ops import cpu_matmul_backend, set_cpu_matmul_backend

    before = cpu_matmul_backend()
    set_cpu_matmul_backend(name)
    try:
        yield
    finally:
        set_cpu_matmul_backend(before)


@pytest.fixture(params=["numpy", "numpy-blas", "torch"])
def matmul_backend(request):
    """Every CPU path: the NumPy decoding step with oneDNN prompt products, the same with NumPy's
    BLAS forming the prompt products, and plain torch (their twin)."""
    with cpu_matmul(request.param):
        yield request.param


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


# Half precision against fp32 (documented in tests/test_dtypes.py): (logits, KL, states)
HALF_TOLERANCES = {"bf16": (0.05, 2e-3, 0.1), "fp16": (0.01, 1e-4, 0.02)}


def stepwise(model, tokens):
    """Feed [B, T] tokens one at a time; return per-position logits [B, T, V] and the final state."""
    state, outs = None, []
    for t in range(tokens.shape[1]):
        logits, state = model.forward(tokens[:, t : t + 1], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


def check_sequence_equals_steps(model, tokens, by_steps=None) -> None:
    """Sequence mode (all positions, and last-position-only) against one token at a time."""
    ref_logits, ref_state = by_steps or stepwise(model, tokens)
    logits, state = model.forward(tokens, full_output=True)
    assert_close_to_reference(logits, ref_logits, "all-position logits")
    last, last_state = model.forward(tokens)  # the final layer computes only the last positions
    assert_close_to_reference(last, ref_logits[:, -1], "last logits")
    ref_dict, last_dict = ref_state.to_dict(), last_state.to_dict()
    for name, tensor in state.to_dict().items():
        assert_close_to_reference(tensor, ref_dict[name], name)
        assert_close_to_reference(last_dict[name], ref_dict[name], f"last-only {name}")


def check_batch_rows_independent(model, vocab_size: int = 512) -> None:
    """Three sequences in one batch give what each gives alone: a prompt, then 4 decoding steps
    (on the CPU, one sequence's step products take NumPy's BLAS, several sequences' oneDNN)."""
    tokens = torch.randint(0, vocab_size, (3, 24), generator=torch.Generator().manual_seed(3))
    batch_logits, batch_state = model.forward(tokens[:, :20])
    for t in range(20, 24):
        batch_logits, batch_state = model.forward(tokens[:, t : t + 1], batch_state)
    for b in range(3):
        alone, alone_state = model.forward(tokens[b : b + 1, :20])
        for t in range(20, 24):
            alone, alone_state = model.forward(tokens[b : b + 1, t : t + 1], alone_state)
        assert_close_to_reference(batch_logits[b : b + 1], alone, f"row {b}")
        row = batch_state.select(b).to_dict()
        for name, tensor in alone_state.to_dict().items():
            assert_close_to_reference(row[name], tensor, f"row {b} {name}")


def check_half_precision(path, dtype: str, vocab_size: int) -> None:
    """A prompt then 8 steps in bf16/fp16 against fp32, within HALF_TOLERANCES; state dtypes."""
    from rwkv_cli import load_model

    logit_tol, kl_tol, state_tol = HALF_TOLERANCES[dtype]
    ref_model, model = load_model(path, "cpu", "fp32"), load_model(path, "cpu", dtype)
    tokens = torch.randint(0, vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_state = ref_model.forward(tokens)
    logits, state = model.forward(tokens)
    for t in range(8):  # then a few RNN steps in the same precision
        step = tokens[:, t : t + 1]
        ref_logits, ref_state = ref_model.forward(step, ref_state)
        logits, state = model.forward(step, state)
    assert logits.dtype == torch.float32
    assert_close_to_reference(logits, ref_logits, f"{dtype} logits", rel=logit_tol)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) <= kl_tol
    ref_dict = ref_state.to_dict()
    for name, tensor in state.to_dict().items():
        want = torch.float32 if name.split(".")[-1].startswith("wkv") else model.dtype
        assert tensor.dtype == want, f"{name} is {tensor.dtype}"
        assert_close_to_reference(tensor, ref_dict[name], f"{dtype} {name}", rel=state_tol)


def check_deep_fp16(version: str, folder) -> None:
    """A 24-layer model whose residual stream passes fp16's 65504 in fp32 (deeper layers write
    larger outputs, as in trained models): fp16 stays finite and close, thanks to halving the
    residual every 6 layers with matching output weights (the reference's rescale, §8)."""
    from rwkv_cli import load_model
    from rwkv_cli.testing import random_state_dict, write_checkpoint

    sd = random_state_dict(version, 24, 64, vocab_size=256, dtype=torch.float32)
    for i in range(24):
        sd[f"blocks.{i}.ffn.value.weight"] *= 4000.0 * 2 ** (i // 6)
    path = write_checkpoint(folder / "deep.pth", sd)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    fp32 = load_model(path, "cpu", "fp32")
    residual, _ = fp32.net.blocks(fp32.net.emb[tokens], fp32.zero_state())
    assert float(residual.abs().max()) > 65504, "the test model must overflow fp16 without rescaling"
    ref_logits, _ = fp32.forward(tokens)
    logits, _ = load_model(path, "cpu", "fp16").forward(tokens)
    assert torch.isfinite(logits).all()
    assert_close_to_reference(logits, ref_logits, "deep fp16 logits", rel=0.02)


def default_sigint() -> None:
    """`preexec_fn` for a child that must see Ctrl-C: a shell starts background jobs with SIGINT
    ignored, children inherit that, and Python then installs no KeyboardInterrupt handler, so a
    suite run as `pytest &` would fail the Ctrl-C tests for its own reasons."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args, stdin: bytes = b"", cwd=None, env: dict | None = None):
    """`rwkv ARGS` in this process, through the console entry point (`main`: its one-line
    errors and exit codes), with stdin bytes decoded as a POSIX terminal would (undecodable bytes
    as lone surrogates). Saves a Python start and a torch import per call (~1.5 s on 2 cores)
    over a child process; tests of signals and of a real terminal keep their child processes.
    Returns a CompletedProcess with bytes stdout and stderr."""
    import io
    import subprocess
    import sys

    from rwkv_cli.cli import main

    def stream(data: bytes = b""):
        return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape", newline="")

    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, os.getcwd(), dict(os.environ)
    sys.argv, sys.stdin, sys.stdout, sys.stderr = ["rwkv", *map(str, args)], stream(stdin), stream(), stream()
    out, err = sys.stdout, sys.stderr
    try:
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        for s in (out, err):
            s.flush()
        return subprocess.CompletedProcess(args, code, out.buffer.getvalue(), err.buffer.getvalue())
    finally:
        sys.argv, sys.stdin, sys.stdout, sys.stderr = saved[:4]
        os.chdir(saved[4])
        os.environ.clear()
        os.environ.update(saved[5])
