"""The load-time memory check (`rwkv_cli/memory.py`): what a model needs against what the machine
has, the CPU's bf16 fallback under --dtype auto, cgroup limits, and out-of-memory errors that
reach the user as one line."""

from __future__ import annotations

import sys

import pytest
import torch

from rwkv_cli import memory
from rwkv_cli.checkpoint import load_checkpoint
from rwkv_cli.engine import load_model
from rwkv_cli.errors import RWKVError


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("7", 2, 64, 1024)


@pytest.fixture
def needs(ckpt, monkeypatch):
    """What the test checkpoint needs in each dtype; the skip switch unset."""
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    _, tensors = load_checkpoint(ckpt)
    return {name: memory.required_bytes(memory.weights_bytes(tensors, dt), "cpu")
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def with_available(monkeypatch, n: int) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: n)


def test_weights_bytes_counts_the_loaded_model(ckpt):
    """The estimate is the loaded model's weights, to within the few vectors kept in fp32."""
    _, tensors = load_checkpoint(ckpt)
    net = load_model(ckpt, device="cpu", dtype="fp32").net
    loaded = net.weights_nbytes()
    assert abs(memory.weights_bytes(tensors, torch.float32) - loaded) < 0.02 * loaded
    assert memory.weights_bytes(tensors, torch.bfloat16) * 2 == memory.weights_bytes(tensors, torch.float32)


def test_a_model_that_fits_loads_as_asked(ckpt, needs, monkeypatch, capsys):
    with_available(monkeypatch, needs["fp32"])
    assert load_model(ckpt, device="cpu", dtype="auto").dtype == torch.float32
    assert load_model(ckpt, device="cpu", dtype="fp32").dtype == torch.float32
    assert capsys.readouterr().err == ""


def test_auto_on_the_cpu_falls_back_to_bf16_and_says_so(ckpt, needs, monkeypatch, capsys):
    with_available(monkeypatch, needs["fp32"] - 1)
    model = load_model(ckpt, device="cpu", dtype="auto")
    assert model.dtype == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in fp32 but" in err and "loading it in bf16" in err
    logits, _ = model.forward([1, 2, 3])
    assert torch.isfinite(logits).all()


def test_an_explicit_dtype_that_does_not_fit_is_refused_with_a_hint(ckpt, needs, monkeypatch):
    with_available(monkeypatch, needs["fp32"] - 1)
    with pytest.raises(RWKVError, match=r"RWKV-7 \(Goose\) \d+M needs ~[\d.]+ GiB of memory in fp32, .* "
                                        r"use --dtype bf16") as e:
        load_model(ckpt, device="cpu", dtype="fp32")
    assert "\n" not in str(e.value) and memory.SKIP_ENV in str(e.value)


def test_nothing_fits(ckpt, needs, monkeypatch):
    with_available(monkeypatch, needs["bf16"] - 1)
    for dtype in ("auto", "fp32", "bf16"):
        with pytest.raises(RWKVError, match="use a smaller model"):
            load_model(ckpt, device="cpu", dtype=dtype)


def test_the_check_can_be_skipped_or_unknown(ckpt, needs, monkeypatch):
    with_available(monkeypatch, 0)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert load_model(ckpt, device="cpu", dtype="fp32").dtype == torch.float32
    monkeypatch.delenv(memory.SKIP_ENV)
    with_available(monkeypatch, None)  # macOS, no /proc: no check
    assert load_model(ckpt, device="cpu", dtype="fp32").dtype == torch.float32


def test_cpu_available_memory_is_read_from_this_machine():
    n = memory.available_bytes(torch.device("cpu"))
    if sys.platform.startswith("linux"):
        assert n is not None and 0 < n < 1 << 50
    else:
        assert n is None or n > 0


def _cgroup_tree(tmp_path, proc_line: str, files: dict[str, str], under: str = "") -> tuple:
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "sys"
    d = root / under
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return proc, root


def test_cgroup_v2_limit(tmp_path):
    gib = 1 << 30
    proc, root = _cgroup_tree(tmp_path, "0::/user.slice/job", {
        "memory.max": f"{8 * gib}\n", "memory.current": f"{3 * gib}\n",
        "memory.stat": f"anon {2 * gib}\ninactive_file {gib}\nactive_file 0\n"}, under="user.slice/job")
    assert memory.cgroup_room(proc, root) == 6 * gib  # 8 - (3 - 1): inactive page cache can go
    (root / "user.slice/job/memory.max").write_text("max\n")
    assert memory.cgroup_room(proc, root) is None


def test_cgroup_v1_limit_inside_a_container(tmp_path):
    """v1, and a path that does not exist in the container's view: its top files are its own."""
    gib = 1 << 30
    proc, root = _cgroup_tree(tmp_path, "4:memory:/docker/abc", {
        "memory.limit_in_bytes": f"{4 * gib}\n", "memory.usage_in_bytes": f"{gib}\n",
        "memory.stat": "cache 0\ntotal_inactive_file 0\n"}, under="memory")
    assert memory.cgroup_room(proc, root) == 3 * gib
    (root / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.cgroup_room(proc, root) is None
    assert memory.cgroup_room(tmp_path / "missing", root) is None


def test_out_of_memory_errors_become_one_line():
    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the CPU allocator refuses at once
    except RuntimeError as e:
        cpu = memory.out_of_memory_message(e)
    assert cpu == ("out of memory (could not allocate 1048576.0 GiB); "
                   "try --dtype bf16, fewer sequences at once or a smaller model")
    cuda_error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB\nmore")
    gpu = memory.out_of_memory_message(cuda_error)
    assert gpu.startswith("out of GPU memory (CUDA out of memory. Tried to allocate 20 GiB); ")
    assert memory.out_of_memory_message(MemoryError()).startswith("out of memory (MemoryError)")
    raw = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    assert memory.out_of_memory_message(raw).startswith("out of GPU memory (CUDA error: out of memory); ")
    assert memory.out_of_memory_message(RuntimeError("shape mismatch")) is None


def test_cli_refusal_is_one_line_and_exit_1(ckpt, needs, monkeypatch, capsys):
    """The console entry point (`main`) prints the refusal as `error: ...`, no traceback."""
    from rwkv_cli.cli import main

    with_available(monkeypatch, needs["bf16"] - 1)
    monkeypatch.setattr(sys, "argv", ["rwkv", "generate", "-m", str(ckpt), "hi", "-n", "2"])
    monkeypatch.setattr(sys, "stdin", None)  # no piped input
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: RWKV-7 (Goose)") and err.count("\n") == 1


def test_cli_out_of_memory_mid_run_is_one_line(make_ckpt, monkeypatch, capsys):
    from rwkv_cli import engine
    from rwkv_cli.cli import main

    def fail(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.Model, "forward", fail)
    world = make_ckpt("7", 2, 64, 65536)  # a vocabulary the World tokenizer serves
    monkeypatch.setattr(sys, "argv", ["rwkv", "generate", "-m", str(world), "hi", "-n", "2"])
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(sys, "stdin", None)  # no piped input
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: out of GPU memory (CUDA out of memory.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_free_memory_is_checked(ckpt, make_ckpt, monkeypatch):
    """On a real GPU: with all but ~64 MiB of it taken, a model needing more is refused before
    its load, with the GPU's free memory in the message; once freed, it loads."""
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    big = make_ckpt("7", 4, 512, 65536)  # ~100M parameters: ~0.2 GB in fp16, plus room
    device = torch.device("cuda")
    free = memory.available_bytes(device)
    assert 0 < free <= torch.cuda.mem_get_info(device)[1]
    hog = torch.empty(free - (64 << 20), dtype=torch.uint8, device=device)
    try:
        with pytest.raises(RWKVError, match=r"GiB is free on cuda:\d; .*--device cpu"):
            load_model(big, device="cuda", dtype="auto")
    finally:
        del hog
        torch.cuda.empty_cache()
    assert load_model(big, device="cuda", dtype="auto").dtype == torch.float16


def test_chat_goes_on_after_out_of_memory(make_ckpt, monkeypatch, capsys):
    """A reply that runs out of memory is one error line; the chat reads the next message, and the
    conversation goes on from the state before the failed turn."""
    import io

    from rwkv_cli import engine
    from rwkv_cli.cli import main

    real, calls = engine.Model.forward, []

    def first_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine.Model, "forward", first_fails)
    world = make_ckpt("7", 2, 64, 65536)
    monkeypatch.setattr(sys, "argv", ["rwkv", "chat", "-m", str(world), "--temp", "0", "-n", "4"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHello\n/show\n"))
    with pytest.raises(SystemExit) as e:
        main()  # ends at the end of stdin
    out = capsys.readouterr()
    assert e.value.code == 0
    assert "error: out of GPU memory (CUDA out of memory." in out.err
    assert len(calls) > 1 and out.out.strip()  # the second message got a reply
    assert "exchanges: 1" in out.err  # the failed turn left nothing behind
