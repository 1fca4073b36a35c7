"""`rwkv chat` end to end: scripted (stdin) and in a pseudo-terminal (pexpect), and `rwkv state`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from rwkv_cli import load_model
from rwkv_cli.statefile import load_state, read_meta

from .conftest import default_sigint, run_cli

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", RWKV_NOHISTORY="1", PROMPT_TOOLKIT_NO_CPR="1")
GREEDY = ["--temp", "0"]


def rwkv(*args, stdin: str = "", timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "rwkv_cli", *map(str, args)], input=stdin.encode(),
                          capture_output=True, env=env or ENV, timeout=timeout)


@pytest.fixture(scope="module")
def model(make_ckpt):
    return make_ckpt("7", 2, 64, 65536)


def test_scripted_chat_with_commands(model, tmp_path):
    script = "Hello\n/show\n/undo\nHello\n/retry\n/save {p}\n/set temperature 0.5\n/nonsense\n/bye\n".format(p=tmp_path / "s")
    out = rwkv("chat", "-m", model, *GREEDY, "-n", "6", stdin=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert len(lines) == 3 and lines[0] == lines[1] == lines[2]  # the same greedy reply, thrice
    err = out.stderr.decode()
    assert "tokens in state" in err and "removed" in err and "unknown command /nonsense" in err
    assert read_meta(tmp_path / "s")["transcript"][0]["user"] == "Hello"


def test_resume_in_a_new_process_continues_exactly(model, tmp_path):
    """A greedy chat saved after turn 2 and resumed elsewhere says what the uninterrupted one says."""
    state = tmp_path / "chat.rwkvstate"
    first = rwkv("chat", "-m", model, *GREEDY, "-n", "8", "--state", state, stdin="one\ntwo\n")
    assert first.returncode == 0 and state.exists(), first.stderr
    resumed = rwkv("chat", "-m", model, *GREEDY, "-n", "8", "--state", state, stdin="three\n")
    whole = rwkv("chat", "-m", model, *GREEDY, "-n", "8", stdin="one\ntwo\nthree\n")
    assert resumed.returncode == whole.returncode == 0
    assert resumed.stdout and whole.stdout.endswith(resumed.stdout)
    assert [t["user"] for t in read_meta(state)["transcript"]] == ["one", "two", "three"]


def test_mismatched_state_file_is_refused(model, make_ckpt, tmp_path):
    state = tmp_path / "chat.rwkvstate"
    run_cli("chat", "-m", model, *GREEDY, "-n", "4", "--state", state, stdin=b"hi\n")
    other = make_ckpt("7", 2, 64, 65536, seed=11)
    out = run_cli("chat", "-m", other, "--state", state, stdin=b"hi\n")
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err
    assert str(model) in err and str(other) in err and err.count("error:") == 1


def test_state_save_then_generate_from_it(model, tmp_path):
    from typer.testing import CliRunner

    from rwkv_cli.cli import app

    def run(*args):  # in-process: the same commands, without a Python start each time
        out = CliRunner().invoke(app, list(map(str, args)), input="")
        assert out.exit_code == 0, out.output
        return out.stdout

    doc = tmp_path / "doc.txt"
    doc.write_text("The secret word is apricot. " * 20)
    st = tmp_path / "doc.rwkvstate"
    run("state", "save", "-m", model, "-f", doc, "-o", st, "-q")
    piped = tmp_path / "piped.rwkvstate"  # no -p or -f: piped text, as generate reads it
    assert run_cli("state", "save", "-m", model, "-o", piped, "-q", stdin=doc.read_bytes()).returncode == 0
    assert read_meta(piped)["text"] == doc.read_text() and read_meta(piped)["tokens"] == read_meta(st)["tokens"]
    shown = run("state", "show", st)
    assert "prompt" in shown and "secret word" in shown
    assert run("generate", "-m", model, "--state", st, " Q:", "-n", "6", *GREEDY, "-q")
    direct = run("generate", "-m", model, "-f", doc, "-n", "6", *GREEDY, "-q")
    # continuing a state with no prompt at all: the saved logits are the next token's
    assert run("generate", "-m", model, "--state", st, "-n", "6", *GREEDY, "-q") == direct


def test_a_state_names_its_model_and_given_settings_win(model, tmp_path):
    """Resuming without -m loads the model the state was saved with (from another folder too);
    sampling flags and --think given now apply, a new --system is refused with a notice."""
    state = tmp_path / "chat.rwkvstate"
    assert run_cli("chat", "-m", model, *GREEDY, "-n", "4", "--state", state, stdin=b"hi\n").returncode == 0
    env = {k: v for k, v in ENV.items() if k != "RWKV_MODEL"}
    out = run_cli("chat", "--state", state, "--temp", "0.7", "--think", "--system", "new", stdin=b"/show\n",
                  cwd="/", env=env)
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert f"loaded {model} (the model of {state})" in err
    assert "temperature=0.7" in err and "think: on" in err and "--system is not applied" in err
    moved = tmp_path / "elsewhere.pth"
    Path(model).rename(moved)
    try:
        gone = run_cli("generate", "--state", state, "x", "-n", "2")
    finally:
        moved.rename(model)
    assert gone.returncode == 1 and gone.stderr.decode().count("\n") == 1
    assert f"{state} was saved with {model}, which cannot be loaded here" in gone.stderr.decode()


def test_a_state_from_before_specs_resumes_as_it_did(model, tmp_path):
    """State files saved before `model.spec` was recorded name their model by the path as typed,
    maybe relative to another folder: resuming them without -m uses $RWKV_MODEL or the default,
    as it did when they were written (the fingerprint check still guards)."""
    from safetensors.torch import load_file, save_file

    state = tmp_path / "old.rwkvstate"
    assert run_cli("chat", "-m", model, *GREEDY, "-n", "2", "--state", state, stdin=b"hi\n").returncode == 0
    with safe_open(str(state), "pt") as f:
        header = f.metadata()
    meta = json.loads(header["meta"])
    del meta["model"]["spec"]
    meta["model"]["source"] = Path(model).name  # relative, as typed in the model's folder
    save_file(load_file(str(state)), str(state), metadata={**header, "meta": json.dumps(meta)})
    env = dict(ENV, RWKV_MODEL=str(model))
    out = run_cli("chat", "--state", state, *GREEDY, "-n", "2", stdin=b"again\n", cwd="/", env=env)
    assert out.returncode == 0, out.stderr
    assert f"loaded {model}:".encode() in out.stderr and b"resumed" in out.stderr


def test_chat_from_a_read_document_keeps_the_document(model, tmp_path):
    """A state from `rwkv state save` is a starting point: chatting from it saves the chat next to
    it and leaves the document's state as it was."""
    doc = tmp_path / "doc.rwkvstate"
    assert run_cli("state", "save", "-m", model, "-p", "A manual.", "-o", doc, "-q").returncode == 0
    before = doc.read_bytes()
    for n in (1, 2):
        out = run_cli("chat", "--state", doc, *GREEDY, "-n", "3", stdin=b"hi\n")
        assert out.returncode == 0 and "holds a read prompt (not a chat)" in out.stderr.decode()
    assert doc.read_bytes() == before
    chats = [tmp_path / "doc-chat.rwkvstate", tmp_path / "doc-chat-2.rwkvstate"]
    assert all(read_meta(p)["kind"] == "chat" and read_meta(p)["tokens"] > 3 for p in chats)


def test_batch_prompts_from_a_state(model, tmp_path):
    """`generate --batch --state`: every prompt starts from the state, as `generate --state` does
    for one; --save-state has no single sequence to save there."""
    st = tmp_path / "doc.rwkvstate"
    assert run_cli("state", "save", "-m", model, "-p", "The secret word is apricot.", "-o", st, "-q").returncode == 0
    jobs = tmp_path / "q.jsonl"
    jobs.write_text('{"prompt": " Q: the word?"}\n{"prompt": " Q: again?"}\n')
    out = run_cli("generate", "--batch", jobs, "--state", st, "-n", "5", *GREEDY, "-q")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
    for row, prompt in zip(rows, (" Q: the word?", " Q: again?"), strict=True):
        one = run_cli("generate", "--state", st, prompt, "-n", "5", *GREEDY, "-q", "--json")
        assert json.loads(one.stdout)["tokens"] == row["tokens"]
    refused = run_cli("generate", "--batch", jobs, "--save-state", tmp_path / "x", "-m", model)
    assert refused.returncode == 2 and b"--batch runs many" in refused.stderr


def test_scripted_chat_survives_bad_lines(model, tmp_path):
    """Bad /set values and undecodable bytes are each one error line, and the chat goes on; a
    \"\"\" block that the input ends inside is still sent. A --state in a folder that does not
    exist is refused before the model loads."""
    script = (b"/set think maybe\n/set top_k x\n/set max_tokens -5\n/set ban_tokens 5\n/set temperature 0\n"
              b"/set seed 3\n/set seed none\nhi \xff\xfe there\n/show\n\"\"\"\nline one\nline two")
    out = run_cli("chat", "-m", model, "-n", "3", stdin=script)
    err = out.stderr.decode()
    assert out.returncode == 0 and "Traceback" not in err, err
    for expected in ("think is one of on, off, default", "top_k takes an integer, not 'x'",
                     "max_tokens must be >= -1", "unknown setting ban_tokens", "not valid UTF-8; not sent",
                     "exchanges: 0", "seed=None"):
        assert expected in err
    # a UTF-8 locale's stdin is strict: the bad byte must still be refused, not end the chat
    strict = subprocess.run([sys.executable, "-m", "rwkv_cli", "chat", "-m", str(model), "-n", "2"],
                            input=b"hi \xff there\nhello\n", capture_output=True, timeout=120,
                            env=dict(ENV, PYTHONIOENCODING="utf-8:strict"))
    assert strict.returncode == 0 and b"not valid UTF-8; not sent" in strict.stderr and strict.stdout.strip()
    assert out.stdout.strip()  # the unterminated block got a reply
    gone = run_cli("chat", "-m", model, "--state", tmp_path / "no-such-folder" / "c.rwkvstate", stdin=b"hi\n")
    assert gone.returncode == 1 and b"does not exist" in gone.stderr and b"loaded" not in gone.stderr


def test_blocks_are_messages_and_ctrl_c_in_a_command_keeps_the_chat(model, monkeypatch):
    """A \"\"\" block is a message even when it starts with "/"; Ctrl-C during a command (a slow
    /save or /load) cancels it, not the chat; Ctrl-C while the model reads a message says the
    message was not sent."""
    from rwkv_cli import engine
    from rwkv_cli.cli import chat

    def interrupted(ui, arg):
        raise KeyboardInterrupt

    monkeypatch.setitem(chat.COMMANDS, "/transcript", interrupted)
    real, calls = engine.Model.forward, []

    def first_interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine.Model, "forward", first_interrupted)
    script = b'dropped\n/transcript\n"""\n/etc/hosts is a file\nwhat is it?\n"""\n/show\n'
    out = run_cli("chat", "-m", model, *GREEDY, "-n", "3", stdin=script)
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "it was not sent" in err and "(cancelled)" in err and "unknown command" not in err
    assert "exchanges: 1" in err and out.stdout.strip()  # only the block got a reply


def test_a_failed_autosave_keeps_the_chat_going(model, tmp_path, monkeypatch, capsys):
    """A save that fails after a turn (a full disk, a folder removed meanwhile) is one error line;
    the conversation stays in memory for /save PATH."""
    from rwkv_cli.cli.chat import ChatUI
    from rwkv_cli.errors import RWKVError
    from rwkv_cli.sampling import SamplingParams
    from rwkv_cli.session import ChatSession
    from rwkv_cli.tokenizer import load_tokenizer

    session = ChatSession(load_model(model), load_tokenizer("world"), SamplingParams(temperature=0), max_tokens=2)
    ui = ChatUI(session, tmp_path / "c.rwkvstate", quiet=True, history=False)

    def disk_full(path):
        raise RWKVError(f"{path}: cannot save the state (No space left on device)")

    monkeypatch.setattr(ui, "save", disk_full)
    ui.stream(session.send("hi"))
    assert "error: autosave failed" in capsys.readouterr().err and len(session.exchanges) == 1


def test_generate_save_state_adds_to_what_it_started_from(model, tmp_path):
    """`generate --state F --save-state F` extends F (text, token count, creation time kept); a
    chat state or any file that is not a state is refused before anything is generated."""
    doc = tmp_path / "doc.rwkvstate"
    assert run_cli("state", "save", "-m", model, "-p", "Doc start.", "-o", doc, "-q").returncode == 0
    first = read_meta(doc)
    out = run_cli("generate", "--state", doc, " more", "-n", "3", *GREEDY, "-q", "--save-state", doc)
    assert out.returncode == 0, out.stderr
    meta = read_meta(doc)
    assert meta["kind"] == "generate" and meta["text"] == "Doc start. more" + out.stdout.decode()
    assert meta["tokens"] - first["tokens"] - 3 >= 1 and meta["created"] == first["created"]  # + prompt + 3
    chat = tmp_path / "chat.rwkvstate"
    assert run_cli("chat", "-m", model, *GREEDY, "-n", "2", "--state", chat, stdin=b"hi\n").returncode == 0
    for target in (chat, Path(model)):
        before = target.read_bytes()
        refused = run_cli("generate", "-m", model, "x", "-n", "2", "--save-state", target)
        assert refused.returncode == 1 and refused.stdout == b"" and target.read_bytes() == before


pexpect = pytest.importorskip("pexpect")


def spawn_chat(*args):
    child = pexpect.spawn(sys.executable, ["-m", "rwkv_cli", "chat", *map(str, args)], env=ENV, timeout=60,
                          encoding="utf-8", dimensions=(40, 200), preexec_fn=default_sigint)
    child.expect(">>>")
    return child


def test_tty_chat_ctrl_c_save_and_bye(model, tmp_path):
    child = spawn_chat("-m", model, "-n", "-1", "--temp", "1", "--seed", "1")
    child.sendline("Tell me a long story")
    child.expect(r"\S")  # the reply has started
    time.sleep(0.5)
    child.sendintr()  # Ctrl-C: stops the reply, not the chat
    child.expect(r"\[interrupted\]")
    child.expect(">>>")
    save = tmp_path / "tty.rwkvstate"
    child.sendline(f"/save {save}")
    child.expect("saved to")
    child.expect(">>>")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    meta = read_meta(save)
    assert meta["transcript"][0]["interrupted"] and meta["transcript"][0]["assistant"]


def test_kill_during_autosave_keeps_a_valid_state(model, tmp_path):
    state = tmp_path / "auto.rwkvstate"
    rwkv("chat", "-m", model, *GREEDY, "-n", "4", "--state", state, stdin="first\n")
    before = read_meta(state)
    for delay in (0.0, 0.05, 0.2):
        child = spawn_chat("-m", model, *GREEDY, "-n", "3", "--state", state)
        child.sendline("again")
        child.expect(r"\S")
        time.sleep(delay)
        child.kill(signal.SIGKILL)  # somewhere around the autosave after the reply
        child.close(force=True)
        saved = load_state(state, load_model(model, "cpu", "fp32"))
        assert len(saved.meta["transcript"]) >= len(before["transcript"])
