"""State files: round trips, atomic writes, refusals, tuned initial states, and the session logic."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import struct
import time

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.sampling import SamplingParams
from rwkv_cli.session import ChatSession, normalize_message
from rwkv_cli.statefile import (
    StateFileError,
    check_save_target,
    load_state,
    load_tuned_state,
    read_meta,
    save_state,
)
from rwkv_cli.testing import write_checkpoint
from rwkv_cli.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5)


@pytest.fixture(scope="module")
def world():
    return load_tokenizer("world")


@pytest.fixture(scope="module", params=["4", "7"])
def model(request, make_ckpt):
    return load_model(make_ckpt(request.param, 2, 64, 65536), "cpu", "fp32")


def test_round_trip_continues_identically(model, tmp_path):
    logits, state = model.forward([[5, 6, 7, 8]])
    path = save_state(tmp_path / "s.rwkvstate", state, model, logits=logits, tokens=4, transcript=[], kind="prompt")
    saved = load_state(path, model)
    assert torch.equal(saved.logits, logits)
    a, _ = model.forward([[9]], state)
    b, _ = model.forward([[9]], saved.state)
    assert torch.equal(a, b)
    meta = read_meta(path)
    assert meta["tokens"] == 4 and meta["model"]["fingerprint"] == model.fingerprint and meta["created"]


def test_created_survives_overwrites(model, tmp_path):
    state = model.zero_state()
    path = save_state(tmp_path / "s", state, model, created="2020-01-01T00:00:00")
    assert read_meta(path)["created"] == "2020-01-01T00:00:00"


def test_another_model_is_refused_naming_both(model, make_ckpt, tmp_path):
    _, state = model.forward([[1, 2]])
    path = save_state(tmp_path / "s", state, model)
    same_shape = load_model(make_ckpt(model.cfg.version, 2, 64, 65536, seed=7), "cpu", "fp32")
    with pytest.raises(StateFileError, match="different file of the same shape") as err:
        load_state(path, same_shape)
    assert str(model.path) in str(err.value) and str(same_shape.path) in str(err.value)
    other = load_model(make_ckpt("7" if model.cfg.version == "4" else "4", 2, 64, 65536), "cpu", "fp32")
    with pytest.raises(StateFileError, match="different architecture"):
        load_state(path, other)


def test_damaged_files_get_one_line_errors(model, tmp_path):
    _, state = model.forward([[1, 2]])
    good = save_state(tmp_path / "good", state, model).read_bytes()
    cases = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not a state": b"hello world, not a state file at all",
        "a checkpoint": (tmp_path / "ckpt.pth").read_bytes() if (write_checkpoint(tmp_path / "ckpt.pth", {"emb.weight": torch.zeros(2, 2)})) else b"",
    }
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    header["__metadata__"]["meta"] = "{not json"
    edited = json.dumps(header).encode()
    cases["hand-edited"] = struct.pack("<Q", len(edited)) + edited + good[8 + n :]
    for name, data in cases.items():
        path = tmp_path / f"{name}.rwkvstate"
        path.write_bytes(data)
        with pytest.raises(StateFileError) as err:
            load_state(path, model)
        assert "\n" not in str(err.value) and str(path) in str(err.value), name


def test_truncated_tensor_data_is_detected(model, tmp_path):
    _, state = model.forward([[1, 2]])
    good = save_state(tmp_path / "good", state, model).read_bytes()
    path = tmp_path / "cut"
    path.write_bytes(good[:-100])  # header intact, data short
    with pytest.raises(StateFileError, match="damaged|truncated"):
        load_state(path, model)


def test_failed_write_keeps_the_previous_file(model, tmp_path, monkeypatch):
    path = save_state(tmp_path / "s", model.zero_state(), model, tokens=1)

    def broken_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", broken_write)
    with pytest.raises(StateFileError, match="No space left"):
        save_state(path, model.zero_state(), model, tokens=2)
    monkeypatch.undo()
    assert read_meta(path)["tokens"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left behind


def _save_forever(path, ckpt):
    model = load_model(ckpt, "cpu", "fp32")
    n = 0
    while True:
        n += 1
        state = model.zero_state()
        state.layers[0].att_shift.fill_(float(n))
        save_state(path, state, model, tokens=n)


def test_kill_during_saves_leaves_a_valid_file(make_ckpt, tmp_path):
    """SIGKILL a process that saves in a loop, at arbitrary moments: the file always loads, and
    holds one complete version (its tensor agrees with its metadata)."""
    ckpt = make_ckpt("7", 2, 64, 65536)
    model = load_model(ckpt, "cpu", "fp32")
    path = tmp_path / "s.rwkvstate"
    ctx = multiprocessing.get_context("spawn")
    for delay in (0.05, 0.13, 0.31):
        proc = ctx.Process(target=_save_forever, args=(path, str(ckpt)))
        proc.start()
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:  # the child is importing torch
            time.sleep(0.02)
        time.sleep(delay)  # now it is saving over and over: kill it somewhere in there
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        saved = load_state(path, model)
        assert float(saved.state.layers[0].att_shift[0, 0]) == saved.meta["tokens"] >= 1
        path.unlink()


def test_tuned_state_file_is_the_initial_state(make_ckpt, tmp_path):
    model = load_model(make_ckpt("7", 2, 64, 65536), "cpu", "fp32")
    tuned = {f"blocks.{i}.att.time_state": torch.randn(1, 64, 64) for i in range(2)}
    path = write_checkpoint(tmp_path / "tuned.pth", tuned)
    state = load_tuned_state(path, model)
    assert torch.equal(state.layers[1].wkv[0], tuned["blocks.1.att.time_state"])  # used as stored: [H, value, key]
    assert torch.count_nonzero(state.layers[0].att_shift) == 0
    bad = write_checkpoint(tmp_path / "bad.pth", {"blocks.0.att.time_state": torch.randn(1, 64, 64)})
    with pytest.raises(StateFileError, match="2 layers"):
        load_tuned_state(bad, model)


def _one_line(err, path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _cli(*args):
    from typer.testing import CliRunner

    from rwkv_cli.cli import app

    return CliRunner().invoke(app, list(map(str, args)), input="")


def test_saving_replaces_only_a_state_file_of_its_family(model, tmp_path):
    """A checkpoint, a text file, a folder, a fifo (or, through a symlink, any of them) is never
    replaced; a chat is never replaced by a read prompt or a generation's state, nor they by a chat."""
    state = model.zero_state()
    ckpt = write_checkpoint(tmp_path / "own.pth", {"emb.weight": torch.zeros(2, 2)})
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    link = tmp_path / "link.rwkvstate"
    link.symlink_to(notes)
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = {p: p.read_bytes() for p in (ckpt, notes)}
    for path, what in ((ckpt, "not an rwkv-cli state file"), (notes, "not an rwkv-cli state file"),
                       (link, "not an rwkv-cli state file"), (folder, "folder"), (fifo, "named pipe")):
        for kind in ("chat", "prompt", "generate"):
            with pytest.raises(StateFileError, match=what) as err:
                save_state(path, state, model, kind=kind)
            assert "another file" in _one_line(err, path) or what == "folder"
    assert {p: p.read_bytes() for p in (ckpt, notes)} == before and link.is_symlink() and fifo.is_fifo()

    chat, doc = tmp_path / "chat.rwkvstate", tmp_path / "doc.rwkvstate"
    save_state(chat, state, model, kind="chat", transcript=[{"user": "hi", "assistant": "hello"}])
    save_state(doc, state, model, kind="prompt", text="A manual.")
    for path, kind, held in ((chat, "generate", "a saved chat"), (chat, "prompt", "a saved chat"),
                             (doc, "chat", "a read prompt")):
        with pytest.raises(StateFileError, match=held) as err:
            save_state(path, state, model, kind=kind)
        assert "another file" in _one_line(err, path)
    assert read_meta(chat)["transcript"] and read_meta(doc)["text"] == "A manual."
    save_state(doc, state, model, kind="generate", text="A manual. More")  # the same family
    save_state(doc, state, model, kind="prompt", text="Again")
    save_state(chat, state, model, transcript=[])  # no kind: a chat, as files from before `kind` were
    check_save_target(tmp_path / "new.rwkvstate", "chat")  # a new file is fine


def test_state_save_checks_its_output_before_loading_the_model(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    out = _cli("state", "save", "-m", tmp_path / "no-such-model.pth", "-p", "hi", "-o", notes, "-q")
    assert out.exit_code == 1 and isinstance(out.exception, StateFileError), out.output
    assert str(notes) in str(out.exception) and notes.read_text() == "my notes"


def test_bad_save_paths_are_one_line_errors_and_make_no_folders(model, tmp_path):
    state = model.zero_state()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    cases = {
        notes / "x.rwkvstate": "is a file, not a folder",
        tmp_path / "missing" / "deeper" / "x.rwkvstate": "folder .*missing/deeper does not exist",
        "/proc/nope/x": "folder /proc/nope does not exist",
        "": "no file name",
    }
    for path, why in cases.items():
        with pytest.raises(StateFileError, match=why) as err:
            save_state(path, state, model)
        _one_line(err, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no folder made, no temporary left


def test_replacing_keeps_the_mode_and_the_symlink(model, tmp_path):
    state = model.zero_state()
    private = save_state(tmp_path / "private.rwkvstate", state, model, tokens=1)
    private.chmod(0o600)
    save_state(private, state, model, tokens=2)
    assert private.stat().st_mode & 0o777 == 0o600 and read_meta(private)["tokens"] == 2

    real = save_state(tmp_path / "real.rwkvstate", state, model, tokens=1)
    link = tmp_path / "link.rwkvstate"
    link.symlink_to(real.name)
    save_state(link, state, model, tokens=2)
    assert link.is_symlink() and read_meta(real)["tokens"] == 2
    dangling = tmp_path / "dangling.rwkvstate"
    dangling.symlink_to("target.rwkvstate")
    save_state(dangling, state, model, tokens=3)
    assert dangling.is_symlink() and read_meta(tmp_path / "target.rwkvstate")["tokens"] == 3

    old = os.umask(0o002)
    try:
        fresh = save_state(tmp_path / "fresh.rwkvstate", state, model)
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o664  # a new file's usual mode: 0o666 less the umask


def _edit_meta(data: bytes, **changes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    header["__metadata__"]["meta"] = json.dumps({**meta, **changes})
    edited = json.dumps(header).encode()
    return struct.pack("<Q", len(edited)) + edited + data[8 + n :]


def test_damaged_contents_are_refused_in_one_line(model, tmp_path):
    """What passed the old checks and crashed later (TypeError in `state show`, chat, /load), or
    blamed the model for the file's NaN: each is one "damaged" line from read_meta or load_state."""
    logits, state = model.forward([[1, 2]])
    good = save_state(tmp_path / "good", state, model, logits=logits, kind="chat").read_bytes()
    meta_cases = {
        "tokens": "lots", "transcript": 7, "sampling": "greedy", "system": ["a"], "kind": 3, "think": "yes",
    }
    files = {f"meta-{k}": _edit_meta(good, **{k: v}) for k, v in meta_cases.items()}
    files["entry-not-object"] = _edit_meta(good, transcript=["hi"])
    files["entry-not-text"] = _edit_meta(good, transcript=[{"user": 1, "assistant": "x"}])
    files["sampling-value"] = _edit_meta(good, sampling={"temperature": "hot"})
    files["sampling-range"] = _edit_meta(good, sampling={"top_p": 7})
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        for read in (read_meta, lambda p: load_state(p, model)):
            with pytest.raises(StateFileError, match="damaged") as err:
                read(path)
            _one_line(err, path)
        shown = _cli("state", "show", path)
        assert shown.exit_code == 1 and isinstance(shown.exception, StateFileError), name

    two_logits, two = model.forward([[1, 2], [3, 4]])
    nan_logits = logits.clone()
    nan_logits[0, 3] = float("nan")
    inf_state = state.clone()
    inf_state.layers[1].att_shift[0, 0] = float("inf")
    tensor_cases = {
        "logits-shape": (state, torch.zeros(1, 10), "logits have shape \\[1, 10\\]"),
        "two-sequences": (two, two_logits, "2 sequences"),
        "nan-logits": (state, nan_logits, "logits holds NaN"),
        "inf-state": (inf_state, logits, "blocks.1.att_shift holds NaN or infinite"),
    }
    for name, (st, lg, why) in tensor_cases.items():
        path = save_state(tmp_path / name, st, model, logits=lg)
        for with_model in (model, None):
            with pytest.raises(StateFileError, match=f"damaged: .*{why}") as err:
                load_state(path, with_model)
            _one_line(err, path)


def test_tuned_state_with_non_finite_values_is_refused(make_ckpt, tmp_path):
    model = load_model(make_ckpt("7", 2, 64, 65536), "cpu", "fp32")
    tuned = {f"blocks.{i}.att.time_state": torch.randn(1, 64, 64) for i in range(2)}
    tuned["blocks.1.att.time_state"][0, 5, 5] = float("nan")
    path = write_checkpoint(tmp_path / "tuned.pth", tuned)
    with pytest.raises(StateFileError, match="blocks.1.att.time_state holds NaN") as err:
        load_tuned_state(path, model)
    _one_line(err, path)


def test_truncated_file_is_reported_from_the_header(model, tmp_path):
    """`state show` reads only the header, yet a cut file is reported there too (no tensor reads)."""
    _, state = model.forward([[1, 2]])
    good = save_state(tmp_path / "good", state, model).read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    cut = tmp_path / "cut.rwkvstate"
    cut.write_bytes(good[: 8 + n + (len(good) - 8 - n) // 2])  # the header whole, half the data
    with pytest.raises(StateFileError, match="truncated") as err:
        read_meta(cut)
    _one_line(err, cut)
    shown = _cli("state", "show", cut)
    assert shown.exit_code == 1 and "truncated" in str(shown.exception)


# -- the chat session logic ----------------------------------------------------------------------

def test_normalize_message():
    assert normalize_message("  a\r\n\r\n\r\nb\n\nc \n") == "a\nb\nc"


def test_undo_then_same_message_reproduces_the_reply(model, world):
    s = ChatSession(model, world, GREEDY, max_tokens=16)
    first = "".join(s.send("Hi"))
    second = "".join(s.send("Tell me more"))
    tokens = s.tokens_consumed
    assert s.undo().user == "Tell me more"
    assert "".join(s.send("Tell me more")) == second and s.tokens_consumed == tokens
    assert "".join(s.retry()) == second  # greedy: the same again
    assert len(s.exchanges) == 2 and s.exchanges[0].reply == first


def test_undo_and_retry_cost_does_not_grow_with_history(model, world):
    s = ChatSession(model, world, GREEDY, max_tokens=2)
    for i in range(30):
        "".join(s.send(f"message {i}"))
    t0 = time.perf_counter()
    s.undo()
    assert time.perf_counter() - t0 < 0.05  # a reference swap, no forward pass


def test_interrupted_reply_keeps_text_and_state(model, world):
    s = ChatSession(model, world, GREEDY, max_tokens=50)
    stream = s.send("Hello")
    got = next(stream) + next(stream)
    stream.close()  # what Ctrl-C does to the consumer
    assert s.exchanges[-1].reply == got and s.exchanges[-1].interrupted
    assert s.tokens_consumed == s.exchanges[-1].prompt_tokens + s.exchanges[-1].reply_tokens
    "".join(s.send("Go on"))  # the next turn closes the open reply first
    assert s._turn_prompt("x").startswith("User:") or s.exchanges[-1].interrupted


def test_session_restore_continues_identically(model, world, tmp_path):
    a = ChatSession(model, world, GREEDY, system="Be brief.", max_tokens=8)
    for msg in ("one", "two"):
        "".join(a.send(msg))
    path = save_state(tmp_path / "c", a.state, model, logits=a.logits, **a.metadata())
    third = "".join(a.send("three"))
    saved = load_state(path, model)
    b = ChatSession(model, world, GREEDY, max_tokens=8)
    b.restore(saved.state, saved.meta, saved.logits)
    assert [e.user for e in b.exchanges] == ["one", "two"] and b.system == "Be brief."
    assert "".join(b.send("three")) == third


def test_saving_removes_temp_files_of_killed_saves(model, tmp_path):
    """A save killed mid-write leaves `.NAME.PID.tmp`; the next save of NAME removes it once that
    process is gone, and leaves alone the temp files of live processes and of other names."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".s.{dead_pid}.tmp"
    live = tmp_path / f".s.{os.getppid()}.tmp"
    other = tmp_path / f".t.{dead_pid}.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    _, state = model.forward([[1, 2]])
    save_state(tmp_path / "s", state, model)
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "s").exists()
