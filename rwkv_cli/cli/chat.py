"""`rwkv chat`: an interactive conversation kept as a recurrent state (undo, retry, save, resume).

In a terminal the input is a prompt-toolkit line editor with a persistent history; when stdin is
not a terminal, lines are read plainly (one message or command per line), so chats can be scripted.
Replies stream to stdout; notices go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..errors import RWKVError
from . import app
from . import common as c

HELP = """Commands:
  /help                 this list
  /bye, /exit           leave (Ctrl-D too)
  /reset                start over (keeps the system prompt)
  /undo                 drop the last exchange
  /retry                sample the last reply again
  /continue             extend the last reply
  /system TEXT          set the system prompt and start over (/system alone clears it)
  /set KEY VALUE        temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty,
                        penalty_decay, seed, max_tokens, think (on/off/default)
  /show                 model, settings, tokens in the state, state size
  /save [PATH]          save the conversation (state + transcript)
  /load PATH            load a saved conversation
  /transcript           print the conversation so far
Enter sends; a line with just \"\"\" starts and ends a multi-line message. Ctrl-C stops a reply."""


def app_dir() -> Path:
    return Path(os.environ.get("RWKV_CLI_HOME") or typer.get_app_dir("rwkv-cli"))


@app.command()
def chat(
    model: c.Model = None,
    revision: c.Revision = None,
    offline: c.Offline = False,
    device: c.Device = "auto",
    dtype: c.Dtype = "auto",
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.", rich_help_panel="Chat")] = None,
    state_file: Annotated[Path | None, typer.Option("--state", help="Resume this saved conversation (if it exists) and keep it saved after every turn.", rich_help_panel="Chat")] = None,
    init_state: Annotated[Path | None, typer.Option("--init-state", help="A BlinkDL state-tuned file (blocks.N.att.time_state) as the initial state (RWKV-5, 6, 7).", rich_help_panel="Chat")] = None,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="G1 reasoning on (<think) or off (empty think block); default: no think tags.", rich_help_panel="Chat")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: your text goes to the model as is.", rich_help_panel="Chat")] = False,
    show_transcript: Annotated[bool, typer.Option("--transcript", help="Print the resumed conversation first.", rich_help_panel="Chat")] = False,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not keep an input history file.", rich_help_panel="Chat")] = False,
    max_tokens: c.MaxTokens = 1024,
    temperature: c.Temperature = None,
    top_p: c.TopP = None,
    top_k: c.TopK = None,
    min_p: c.MinP = None,
    presence_penalty: c.Presence = None,
    frequency_penalty: c.Frequency = None,
    penalty_decay: c.Decay = None,
    seed: c.Seed = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Fewer notices on stderr.")] = False,
) -> None:
    """Chat with a model. The conversation is the model's recurrent state: /undo, /retry and
    /save are instant, and --state resumes it later without re-reading anything.

    \b
    Examples:
      rwkv chat -m rwkv7-g1-0.4b
      rwkv chat --state ~/notes.rwkvstate          # resume, autosave after each turn
      echo "Hello" | rwkv chat -m model.pth --temp 0
    """
    from ..sampling import CHAT_DEFAULTS
    from ..session import ChatSession
    from ..statefile import kind_words, load_state, load_tuned_state

    if state_file is not None and not state_file.exists():  # a new file: can it be written? (before the load)
        from ..statefile import check_save_target

        check_save_target(state_file, "chat")
    net, tok = c.load_model_for_cli(model, revision, offline, device, dtype, quiet, state_file=state_file)
    family = "world" if getattr(tok, "name", "") == "world" or net.cfg.version == "7" else "pile"
    defaults = dict(CHAT_DEFAULTS[family])
    if init_state is not None:  # a tuned state wants less randomness (ChatRWKV)
        defaults.update(top_p=0.2, presence_penalty=0.3, frequency_penalty=0.3)
    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, seed=seed)
    params = c.sampling_params(defaults, **flags)
    tuned = load_tuned_state(init_state, net) if init_state is not None else None
    session = ChatSession(net, tok, params, system=system, think=think, raw=raw, max_tokens=max_tokens, init_state=tuned)
    ui = ChatUI(session, state_file, quiet, history=not (no_history or os.environ.get("RWKV_NOHISTORY")))
    if state_file is not None and state_file.exists():
        saved = load_state(state_file, net)
        ui.restore(saved)
        document = saved.meta.get("kind", "chat") != "chat"
        _prefer_given_settings(session, flags, think, None if document else system, raw and not document)
        if document:  # a read document stays as it is, to start from again
            session.raw, ui.created = raw, None
            if system is not None:
                c.err("--system is not applied when starting from a read document (put it before the text "
                      "when reading it)")
            ui.state_file = _beside(state_file, "chat")
            c.err(f"{state_file} holds {kind_words(saved.meta.get('kind'))} (not a chat): the chat starts "
                  f"from it and is saved to {ui.state_file}")
        elif not quiet:
            c.err(f"resumed {state_file}: {len(session.exchanges)} exchanges, {session.tokens_consumed} tokens")
        if show_transcript:
            ui.print_transcript()
    ui.run()


def _prefer_given_settings(session, flags: dict, think, system, raw: bool) -> None:
    """After a resume, the settings given on this command line win over the saved ones where
    they can: sampling and think apply to the next turns. A system prompt or raw mode is part of
    the conversation already read, so a different one is not applied, and that is said."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        session.params = session.params.with_overrides(**given)
    if think is not None:
        session.think = think
    if system is not None and system != session.system:
        c.err("--system is not applied to a resumed conversation (its system prompt is in the state); "
              "/system TEXT starts over with a new one")
    if raw and not session.raw:
        c.err("--raw is not applied to a resumed conversation that used the chat template")


def _beside(path: Path, tag: str) -> Path:
    """`name-TAG.ext` next to `path`, or `name-TAG-2.ext`, ... : the first that does not exist."""
    n = 1
    while True:
        candidate = path.with_name(f"{path.stem}-{tag}{'' if n == 1 else f'-{n}'}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


# What /set changes in the sampling parameters, and how its value is read.
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "presence_penalty": float,
            "frequency_penalty": float, "penalty_decay": float, "seed": int}
THINK_VALUES = {"on": True, "off": False, "default": None}


def _parse_number(key: str, value: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key} takes {'an integer' if kind is int else 'a number'}, not {value!r}") from None


class ChatUI:
    """The read-eval-print loop: input, slash commands, streaming replies, autosave."""

    def __init__(self, session, state_file: Path | None, quiet: bool, history: bool):
        self.s, self.state_file, self.quiet = session, state_file, quiet
        self.tty = sys.stdin.isatty() and sys.stdout.isatty()
        self.prompt_session = self._prompt_session(history) if self.tty else None
        self.created = None

    # -- input ----------------------------------------------------------------------------------
    def _prompt_session(self, history: bool):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        if history:
            app_dir().mkdir(parents=True, exist_ok=True)
            hist = FileHistory(str(app_dir() / "chat_history"))
        else:
            hist = InMemoryHistory()
        commands = ["/help", "/bye", "/exit", "/reset", "/undo", "/retry", "/continue", "/system", "/set", "/show", "/save", "/load", "/transcript"]
        return PromptSession(history=hist, auto_suggest=AutoSuggestFromHistory(),
                             completer=WordCompleter(commands, sentence=True), complete_while_typing=False)

    def _read_line(self, continuation: bool = False) -> str:
        """One line; EOFError at the end of input or Ctrl-D."""
        if self.prompt_session is not None:
            return self.prompt_session.prompt("... " if continuation else ">>> ")
        # bytes, decoded here: a strict stdin (a UTF-8 locale) would raise on a bad byte before the
        # line could be refused; lone surrogates mark them as in the C locale's stdin
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline().encode()
        if not raw:
            raise EOFError
        return raw.decode("utf-8", errors="surrogateescape").rstrip("\n").rstrip("\r")

    def read_message(self) -> tuple[str, bool]:
        """(text, whether it came as a block): one line, or several between lines holding only
        \"\"\". A block is always a message, even if it starts with "/"."""
        line = self._read_line()
        if line.strip() != '"""':
            return line, False
        lines = []
        while True:
            try:
                line = self._read_line(continuation=True)
            except EOFError:  # input ended inside the block (a script without the closing """): send it
                if not lines:
                    raise
                return "\n".join(lines), True
            if line.strip() == '"""':
                return "\n".join(lines), True
            lines.append(line)

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        if self.tty and not self.quiet:
            c.err("Type /help for commands, /bye or Ctrl-D to leave.")
        while True:
            try:
                text, block = self.read_message()
            except KeyboardInterrupt:
                c.err("(Ctrl-C stops a reply; use /bye or Ctrl-D to leave)")
                continue
            except EOFError:
                break
            if not text.strip():
                continue
            try:
                c.utf8_argument(text, "that line")
            except RWKVError as e:  # undecodable bytes on a pipe reach Python as lone surrogates
                c.err(f"error: {e}; not sent")
                continue
            if text.lstrip().startswith("/") and not block:
                try:
                    if self.command(text.strip()) == "exit":
                        break
                except KeyboardInterrupt:  # a slow /save, /load or /system: the chat stays
                    c.err("(cancelled)")
                continue
            exchanges = len(self.s.exchanges)
            if self.stream(self.s.send(text)) and len(self.s.exchanges) == exchanges:
                c.err("(stopped while reading the message: it was not sent)")
        self.autosave()

    def stream(self, pieces) -> bool:
        """Print a reply as it arrives; Ctrl-C stops it but keeps what was said (and the state).
        Running out of memory mid-reply (a GPU shared with other work) is one error line, and the
        conversation goes on from the last state that was computed. Returns whether it stopped
        early (Ctrl-C or out of memory)."""
        from ..memory import out_of_memory_message

        out, first = sys.stdout, True
        try:
            for piece in pieces:
                if first:
                    piece, first = piece.lstrip(" "), False
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            c.err("[interrupted]")
            self.autosave()
            return True
        except (MemoryError, RuntimeError) as e:
            message = out_of_memory_message(e)
            if message is None:
                raise
            out.write("\n")
            out.flush()
            c.err(f"error: {message}")
            self.autosave()
            return True
        out.write("\n")
        out.flush()
        self.autosave()
        return False

    # -- commands -------------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handler = COMMANDS.get(name)
        if handler is None:
            c.err(f"unknown command {name} (try /help)")
            return None
        try:
            return handler(self, arg)
        except (ValueError, RWKVError) as e:
            c.err(f"error: {e}")
            return None

    def cmd_help(self, arg):
        print(HELP, file=sys.stderr)

    def cmd_bye(self, arg):
        return "exit"

    def cmd_reset(self, arg):
        self.s.reset()
        c.err("(conversation reset)")
        self.autosave()

    def cmd_undo(self, arg):
        ex = self.s.undo()
        if ex is None:
            c.err("(nothing to undo in this session)")
            return
        c.err(f"(removed: {ex.user[:60]!r})")
        self.autosave()

    def cmd_retry(self, arg):
        self.stream(self.s.retry())

    def cmd_continue(self, arg):
        self.stream(self.s.continue_reply())

    def cmd_system(self, arg):
        self.s.set_system(arg or None)
        c.err("(system prompt set; conversation reset)" if arg else "(system prompt cleared; conversation reset)")
        self.autosave()

    def cmd_set(self, arg):
        key, _, value = arg.partition(" ")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not key or not value:
            raise ValueError("usage: /set KEY VALUE")
        if key == "max_tokens":
            n = _parse_number(key, value, int)
            if n < -1:
                raise ValueError("max_tokens must be >= -1 (-1: until a stop)")
            self.s.max_tokens = n
        elif key == "think":
            if value not in THINK_VALUES:
                raise ValueError(f"think is one of {', '.join(THINK_VALUES)}")
            self.s.think = THINK_VALUES[value]
        elif key in SETTABLE:
            if key == "seed" and value == "none":  # with_overrides skips None: it means "not given" there
                self.s.params = replace(self.s.params, seed=None)
            else:
                self.s.params = self.s.params.with_overrides(**{key: _parse_number(key, value, SETTABLE[key])})
        else:
            raise ValueError(f"unknown setting {key} (one of max_tokens, think, {', '.join(SETTABLE)})")
        c.err(f"({key} = {value})")

    def cmd_show(self, arg):
        s, net = self.s, self.s.model
        state_mb = (s.state.nbytes if s.state is not None else net.cfg.state_numel() * 4) / 1e6
        rows = [
            ("model", f"{getattr(net, 'source', None) or net.path} ({net.cfg.describe()})"),
            ("device", f"{net.device} {str(net.dtype).replace('torch.', '')}"),
            ("tokens in state", s.tokens_consumed),
            ("state size", f"{state_mb:.2f} MB (the same after 5 turns or 5,000)"),
            ("exchanges", len(s.exchanges)),
            ("system", s.system or "-"),
            ("think", {True: "on", False: "off", None: "default"}[s.think]),
            ("max_tokens", s.max_tokens),
            ("sampling", ", ".join(f"{k}={v}" for k, v in vars(s.params).items() if k != "ban_tokens")),
            ("autosave", str(self.state_file) if self.state_file else "off"),
        ]
        for key, value in rows:
            print(f"{key:>16}: {value}", file=sys.stderr)

    def cmd_save(self, arg):
        path = Path(arg).expanduser() if arg else self.state_file
        if path is None:  # our own folder, made on first use (an explicit path's folder must exist)
            sessions = app_dir() / "sessions"
            try:
                sessions.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RWKVError(f"cannot make {sessions} ({e.strerror or e}); give /save a path") from None
            path = sessions / time.strftime("chat-%Y%m%d-%H%M%S.rwkvstate")
        self.save(path)
        c.err(f"(saved to {path})")

    def cmd_load(self, arg):
        from ..statefile import load_state

        if not arg:
            raise ValueError("usage: /load PATH")
        self.restore(load_state(Path(arg).expanduser(), self.s.model))
        c.err(f"(loaded {arg}: {len(self.s.exchanges)} exchanges, {self.s.tokens_consumed} tokens)")

    def cmd_transcript(self, arg):
        self.print_transcript()

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from ..statefile import save_state

        state = self.s.state if self.s.state is not None else self.s.model.zero_state()
        save_state(path, state, self.s.model, logits=self.s.logits, created=self.created, **self.s.metadata())

    def autosave(self) -> None:
        """Save to --state after every turn. A failure (a full disk, a folder gone) is said and the
        chat goes on: the conversation is still in memory, and /save PATH can put it elsewhere."""
        if self.state_file is None:
            return
        try:
            self.save(self.state_file)
        except RWKVError as e:
            c.err(f"error: autosave failed: {e}; /save PATH saves elsewhere")

    def restore(self, saved) -> None:
        self.created = saved.meta.get("created")
        self.s.params = self.s.params.with_overrides(**{k: v for k, v in (saved.meta.get("sampling") or {}).items()
                                                       if k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "penalty_decay")})
        self.s.restore(saved.state, saved.meta, saved.logits)

    def print_transcript(self) -> None:
        for ex in self.s.exchanges:
            print(f">>> {ex.user}\n{ex.reply.strip()}" + (" [interrupted]" if ex.interrupted else ""))


COMMANDS = {
    "/help": ChatUI.cmd_help, "/?": ChatUI.cmd_help, "/bye": ChatUI.cmd_bye, "/exit": ChatUI.cmd_bye,
    "/quit": ChatUI.cmd_bye, "/reset": ChatUI.cmd_reset, "/clear": ChatUI.cmd_reset, "/undo": ChatUI.cmd_undo,
    "/retry": ChatUI.cmd_retry, "/continue": ChatUI.cmd_continue, "/system": ChatUI.cmd_system,
    "/set": ChatUI.cmd_set, "/show": ChatUI.cmd_show, "/save": ChatUI.cmd_save, "/load": ChatUI.cmd_load,
    "/transcript": ChatUI.cmd_transcript,
}
