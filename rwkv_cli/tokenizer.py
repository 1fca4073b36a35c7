"""Tokenizers: BlinkDL's World vocabulary, Hugging Face `tokenizer.json`, and streaming decode.

World (`rwkv-models.md` §13.1): greedy longest match over the UTF-8 bytes against 65,529 tokens;
id 0 is end of text and ids 1-256 are the single bytes, so any byte string encodes. The vocabulary
ships packed in `data/rwkv_vocab_v20230424.bin` (see `data/build_world_vocab.py`), which loads in
milliseconds instead of the ~2 s the reference spends parsing the text file at every start.

Why pure Python (numbers from `benchmarks/bench_tokenizer.py`, ours vs the reference, same run).
This module loads in 0.05 s (reference 2.4 s); it encodes new text 1.4x (multilingual) to 2.5x
(English prose) faster and text it has seen before (cached pieces) 4-5x faster; it decodes
about 2x faster. The 35 MB/s goal needs native code, and the native World tokenizers on PyPI
fall short of this project's bar: `rwkv-tokenizer` 0.11.0 ships wheels for CPython 3.10 only
(newer Pythons get 0.5.2 or nothing), and `pyrwkv-tokenizer` 0.9.1 (~20 MB/s, and it matched
the reference on our sample) takes 0.22-0.33 s to load (it parses the text file at every
start), has no wheels for Python 3.14, encodes only `str` (no bytes) and panics on ids >= 65530.
A single regex of the whole trie matches in C as well (~2x the reference), but compiling it
takes 1.2 s at every start.

How encoding is fast without a trie walk per byte. The packed file records which byte pairs
occur inside some token. Where two neighbouring input bytes form a pair that no token contains,
no token can straddle them, so the greedy tokenization of the whole text has a boundary there
and the text can be cut into pieces that tokenize independently. A small regex (compiled at
load) finds such cuts in C; pieces (" the", ".", "\\n\\n") repeat, so their ids come from a cache,
and only unseen pieces go through the greedy matching in Python. The result is identical to the
reference on every input, which `tests/test_tokenizer.py` checks against it.

Hugging Face: any `tokenizer.json` runs through the `tokenizers` library; the GPT-NeoX 20B one
used by RWKV-4 Pile models is fetched into the standard HF cache on first use.

Streaming: `tokenizer.detokenizer()` returns an object fed one id at a time that emits only
complete characters, holding back bytes of a UTF-8 sequence that a later token completes.
"""

from __future__ import annotations

import codecs
import operator
import os
import re
import struct
from collections.abc import Callable, Iterable
from itertools import accumulate, chain, pairwise
from pathlib import Path
from typing import Protocol

from .errors import TokenizerError

WORLD_VOCAB_SIZE = 65536  # embedding rows of World models: 65,529 tokens, id 0, and padding
NEOX_VOCAB_SIZES = (50277, 50304)  # the 20B tokenizer, and RWKV-7 Pile models that pad it
NEOX_REPO, NEOX_FILE = "EleutherAI/gpt-neox-20b", "tokenizer.json"
TOKENIZER_NAMES = ("world", "gpt-neox-20b")
_WORLD_BIN = Path(__file__).parent / "data" / "rwkv_vocab_v20230424.bin"
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class Tokenizer(Protocol):
    """What the engine and the CLI need from any tokenizer."""

    name: str
    vocab_size: int
    eos_id: int | None  # end of text / document

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def detokenizer(self) -> Detokenizer: ...


# --------------------------------------------------------------------------------------- World


class WorldTokenizer:
    """The RWKV World tokenizer: exact greedy longest match, as in BlinkDL's `TRIE_TOKENIZER`."""

    name = "world"
    vocab_size = WORLD_VOCAB_SIZE
    eos_id = 0
    _CACHE_LIMIT = 100_000  # cached pieces before the cache starts over (bounded memory)
    _CACHE_MAX_PIECE = 64  # longer pieces (e.g. CJK runs) rarely repeat; don't keep them

    def __init__(self, path: str | Path = _WORLD_BIN):
        blob = Path(path).read_bytes()
        if blob[:8] != b"RWKVVOC2":
            raise TokenizerError(f"{path}: not a packed World vocabulary")
        n_tok, n_starts = struct.unpack_from("<II", blob, 8)
        ends = list(accumulate(blob[16 : 16 + n_tok], initial=16 + n_tok))
        tokens = [blob[a:b] for a, b in pairwise(ends)]
        self.tokens = tokens  # id i + 1 is tokens[i]
        # id -> bytes for every id a World model can emit; id 0 and the padding are empty
        self._table = [b""] + tokens + [b""] * (WORLD_VOCAB_SIZE - 1 - n_tok)
        self._ids = dict(zip(tokens[256:], range(257, n_tok + 1), strict=True))  # the tokens of 2+ bytes
        pos = ends[-1] + 8192
        self._split = re.compile(_cut_pattern(blob[ends[-1] : pos]), re.DOTALL).findall
        self._sizes: dict[bytes, bytes] = {}  # first 2 bytes -> token lengths, longest first
        for _ in range(n_starts):
            k = blob[pos + 2]
            self._sizes[blob[pos : pos + 2]] = blob[pos + 3 : pos + 3 + k]
            pos += 3 + k
        self._cache: dict[bytes, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids for any byte string (tokens may hold partial UTF-8 characters)."""
        pieces = self._split(bytes(data))
        cache = self._cache
        found = list(map(cache.get, pieces))
        if None in found:  # walk each unseen piece once, then look everything up again
            new = {piece: self._walk(piece) for piece in set(pieces).difference(cache)}
            cache.update(new)
            found = list(map(cache.get, pieces))
            if None in found:  # another thread cleared the cache in between
                found = [ids or new.get(p) or self._walk(p) for p, ids in zip(pieces, found, strict=True)]
            for piece in new:  # keep the cache small: long pieces (CJK runs) rarely repeat
                if len(piece) > self._CACHE_MAX_PIECE:
                    del cache[piece]
            if len(cache) > self._CACHE_LIMIT:
                cache.clear()
        return list(chain.from_iterable(found))

    def _walk(self, piece: bytes) -> tuple[int, ...]:
        """Greedy longest match: at each position, try the token lengths that exist for the
        next two bytes, longest first (a piece is short, so few candidates fit)."""
        ids, sizes, out, i, n = self._ids, self._sizes, [], 0, len(piece)
        if whole := ids.get(piece):  # often the piece is one token: the longest match possible
            return (whole,)
        while i < n:
            for size in sizes.get(piece[i : i + 2], b""):
                if size <= n - i and (tid := ids.get(piece[i : i + size])):
                    break
            else:  # byte b is token b + 1: a match always exists
                tid, size = piece[i] + 1, 1
            out.append(tid)
            i += size
        return tuple(out)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the ids; an id outside [0, vocab_size) raises TokenizerError (the padding
        ids 65530-65535 that a model can emit decode to nothing)."""
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if not ids or min(ids) >= 0:  # a negative index would silently wrap around
                return b"".join(map(self._table.__getitem__, ids))
        except IndexError:  # an id past the table, or too large for an index
            pass
        n = len(self._table)
        raise _outside(next(i for i in ids if not 0 <= i < n), n)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id; ids outside the vocabulary decode to nothing (the streaming path:
        ids come from the sampler, so checking them there would only cost time)."""
        i = operator.index(token_id)
        return self._table[i] if 0 <= i < len(self._table) else b""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; invalid UTF-8 becomes U+FFFD per bad sequence (the reference returns
        a single U+FFFD for the whole text instead). Ids outside the vocabulary raise
        TokenizerError."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> ByteDetokenizer:
        return ByteDetokenizer(self.token_bytes)


# Byte classes for the cut regex, most frequent first; every other byte is a class of its own.
_CLASSES = [range(0x61, 0x7B), [0x20], range(0x41, 0x5B), range(0x30, 0x3A), [0x0A]]
_CLASSES += [range(0x80, 0xC0), range(0xE0, 0xF0), range(0xC0, 0xE0), range(0xF0, 0x100)]


def _cut_pattern(pair_bitmap: bytes) -> bytes:
    """A regex whose matches are pieces that tokenize independently (see the module docstring).

    `(?:[K][K]*(?=[F_K]) | ...)*.` : the loop takes a byte only while the byte after it is in the
    follow set F_K of its class K (the bytes seen after any K byte inside a token), so a match
    ends after the first byte whose successor cannot follow it in any token, or at the end.
    Coarse classes only make pieces longer, never wrong. A shortcut tried first (~20% faster on
    prose and code) takes a whole word when the byte after it cannot follow a lowercase letter.
    """
    rows = [int.from_bytes(pair_bitmap[32 * a : 32 * a + 32], "little") for a in range(256)]

    def follow(members) -> bytes:  # the class of bytes that may follow any of `members`
        bits = 0
        for b in members:
            bits |= rows[b]
        return _char_class(bits) if bits else b""

    word = b" ?[A-Z]?[a-z]+(?!" + follow(_CLASSES[0]) + b")"
    grouped = {b for c in _CLASSES for b in c}
    classes = [list(c) for c in _CLASSES] + [[b] for b in range(256) if b not in grouped]
    loop = []
    for members in classes:
        if after := follow(members):  # a byte never followed inside a token always ends a piece
            k = _char_class(sum(1 << b for b in members))
            loop.append(k + (k + b"*" if len(members) > 1 else b"") + b"(?=" + after + b")")
    return word + b"|(?:" + b"|".join(loop) + b")*."


def _char_class(bits: int) -> bytes:
    """A regex character class for the set bits of a 256-bit integer, as byte ranges."""
    members = [b for b in range(256) if bits >> b & 1]
    if len(members) == 1:
        return b"\\x%02x" % members[0]
    parts, start = [], 0
    for k, b in enumerate(members):
        if k + 1 == len(members) or members[k + 1] != b + 1:
            lo = members[start]
            parts.append(b"\\x%02x" % lo if lo == b else b"\\x%02x-\\x%02x" % (lo, b))
            start = k + 1
    return b"[" + b"".join(parts) + b"]"


# ------------------------------------------------------------------------------ Hugging Face


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library (Rust)."""

    def __init__(self, path: str | Path, name: str | None = None):
        from tokenizers import Tokenizer as _HF

        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception with a long message
            raise TokenizerError(f"{path}: not a usable tokenizer.json ({_first_line(e)})") from None
        self.name = name or str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for i in map(self._tok.token_to_id, _EOS_NAMES) if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids. Special tokens are spelled out ("<|endoftext|>"), as `encode` reads
        them from text, so every string round-trips; unknown ids (padding rows) give nothing,
        negative ids and ids beyond 32 bits raise TokenizerError."""
        ids = list(map(operator.index, ids))
        if ids and min(ids) < 0:
            raise _outside(min(ids), self.vocab_size)
        try:
            return self._tok.decode(ids, skip_special_tokens=False)
        except OverflowError:  # the Rust side takes u32 ids
            raise _outside(max(ids), self.vocab_size) from None

    def detokenizer(self) -> WindowDetokenizer:
        return WindowDetokenizer(self.decode)


def check_token_ids(ids: Iterable[int], vocab_size: int) -> None:
    """Raise TokenizerError naming the first id outside [0, vocab_size): for ids a user gives."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise _outside(bad, vocab_size)


def _outside(token_id: int, vocab_size: int) -> TokenizerError:
    return TokenizerError(f"token id {operator.index(token_id)} is outside the vocabulary [0, {vocab_size})")


# --------------------------------------------------------------------------------- Streaming


class ByteDetokenizer:
    """Streaming decode for tokenizers whose tokens are byte strings (World).

    An incremental UTF-8 decoder keeps an incomplete trailing sequence until the bytes that
    complete it arrive; bytes that can never be valid become U+FFFD as soon as that is certain.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """The held-back remainder at the end of the stream (U+FFFD if it is incomplete)."""
        return self._utf8.decode(b"", final=True)


class WindowDetokenizer:
    """Streaming decode for any tokenizer with only a `decode(ids) -> str` (Hugging Face).

    Decoding a lone token can be wrong (byte-level BPE splits characters; some decoders drop a
    leading space), so each step decodes a short window that starts a little before the new
    tokens and emits what the window adds beyond its already-emitted start. Output ending in
    U+FFFD is held back: the next token may complete the character. The window is reset after
    each emission, so a step costs O(1) however long the stream.
    """

    _MAX_HELD = 8  # held-back tokens; no character spans more (4 bytes, at most 4 tokens)

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = 0  # ids[:emitted] are already printed; ids[:0] is the context prefix

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        held = len(self._ids) - self._emitted
        text = self._new_text()
        if text.endswith("\ufffd") and held < self._MAX_HELD:
            return ""
        # Keep only the tokens just emitted as context for the next window.
        self._ids, self._emitted = self._ids[self._emitted :], len(self._ids) - self._emitted
        return text

    def flush(self) -> str:
        text = self._new_text()
        self._ids, self._emitted = [], 0
        return text

    def _new_text(self) -> str:
        before = self._decode(self._ids[: self._emitted])
        after = self._decode(self._ids)
        return after[len(before) :]


# ---------------------------------------------------------------------------------- Choosing


def load_tokenizer(name: str | Path, offline: bool | None = None) -> Tokenizer:
    """By name: 'world', 'gpt-neox-20b', or the path of a tokenizer.json (or its folder)."""
    if str(name) == "world":
        return WorldTokenizer()
    if str(name) == "gpt-neox-20b":
        return _gpt_neox_tokenizer(offline)
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{name}: no such tokenizer (use world, gpt-neox-20b or a tokenizer.json)")
    return HFTokenizer(path)


def load_tokenizer_for(
    checkpoint_path: str | Path, vocab_size: int, offline: bool | None = None
) -> Tokenizer:
    """The tokenizer of a checkpoint: a tokenizer.json next to it wins, else by vocabulary size
    (65,536 rows -> World; 50,277 or 50,304 -> GPT-NeoX 20B), never by the file name.

    `offline=None` follows HF_HUB_OFFLINE.
    """
    beside = Path(checkpoint_path).parent / "tokenizer.json"
    if beside.is_file():
        tok = HFTokenizer(beside)
        if tok.vocab_size > vocab_size:
            raise TokenizerError(
                f"{beside} has {tok.vocab_size} tokens but the model has only {vocab_size} rows"
            )
        return tok
    if vocab_size == WORLD_VOCAB_SIZE:
        return WorldTokenizer()
    if vocab_size in NEOX_VOCAB_SIZES:
        return _gpt_neox_tokenizer(offline)
    raise TokenizerError(
        f"{checkpoint_path}: no known tokenizer has {vocab_size} tokens "
        f"(World has {WORLD_VOCAB_SIZE}, GPT-NeoX 20B {NEOX_VOCAB_SIZES[0]}); "
        "put the model's tokenizer.json next to the checkpoint"
    )


def _gpt_neox_tokenizer(offline: bool | None) -> HFTokenizer:
    """The 20B tokenizer from the Hugging Face cache, downloaded there on first use."""
    from huggingface_hub import hf_hub_download

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        path = hf_hub_download(NEOX_REPO, NEOX_FILE, local_files_only=offline)
    except Exception as e:  # offline misses, network and HTTP errors: all end the same way
        how = "run once online to cache it" if offline else f"the download failed: {_first_line(e)}"
        raise TokenizerError(
            f"the GPT-NeoX 20B tokenizer ({NEOX_FILE} from {NEOX_REPO}) is not in the Hugging Face "
            f"cache; {how}, or put tokenizer.json next to the checkpoint"
        ) from None
    return HFTokenizer(path, name="gpt-neox-20b")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
