"""Regenerate `rwkv_vocab_v20230424.bin` from BlinkDL's text vocabulary.

The text file (`<id> <Python str or bytes literal> <byte length>` per line) takes ~0.5 s to parse
even with `ast.literal_eval`, and it would be parsed at every `rwkv` start. The packed file loads
in a few milliseconds: it is the same tokens as raw bytes, plus two tables derived from them that
the encoder needs (so it does not rebuild them at every start either).

    python rwkv_cli/data/build_world_vocab.py [path/to/rwkv_vocab_v20230424.txt]

Without an argument it reads the copy inside the installed `rwkv` package (a test dependency).
`tests/test_tokenizer.py` rebuilds the file in memory and checks it is byte-identical.

Layout (little-endian):
    b"RWKVVOC2", u32 n_tokens, u32 n_starts
    n_tokens bytes: the length of token id 1..n_tokens
    the token bytes, concatenated in id order
    8192 bytes: bitmap of byte pairs (a, b) that occur next to each other inside some token,
        bit a * 256 + b; a pair that never does is a place no token can straddle
    n_starts records, sorted: 2 bytes that begin tokens, 1 byte k, then the k distinct lengths
        (descending) of the tokens that begin with them: the candidates the encoder tries
"""

from __future__ import annotations

import ast
import struct
import sys
from itertools import pairwise
from pathlib import Path

MAGIC = b"RWKVVOC2"
HERE = Path(__file__).resolve().parent
BIN_PATH = HERE / "rwkv_vocab_v20230424.bin"


def parse_vocab_txt(path: str | Path) -> list[bytes]:
    """Tokens in id order (index 0 is id 1), from BlinkDL's text format, checking every line."""
    tokens: list[bytes] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        first, last = line.index(" "), line.rindex(" ")
        token = ast.literal_eval(line[first:last].strip())  # a literal, never eval
        token = token.encode("utf-8") if isinstance(token, str) else token
        if not isinstance(token, bytes):
            raise ValueError(f"not a str or bytes literal: {line!r}")
        if int(line[:first]) != len(tokens) + 1 or len(token) != int(line[last:]):
            raise ValueError(f"id or length mismatch: {line!r}")
        tokens.append(token)
    return tokens


def pack(tokens: list[bytes]) -> bytes:
    """The packed file's bytes for `tokens` (see the module docstring for the layout)."""
    if tokens[:256] != [bytes([b]) for b in range(256)]:
        raise ValueError("ids 1-256 must be the single bytes 0-255")
    if any(not 0 < len(t) < 256 for t in tokens):
        raise ValueError("token lengths must fit in one byte")
    pairs = bytearray(8192)
    lengths: dict[bytes, set[int]] = {}
    for t in tokens:
        for a, b in pairwise(t):
            bit = a * 256 + b
            pairs[bit >> 3] |= 1 << (bit & 7)
        if len(t) > 1:
            lengths.setdefault(t[:2], set()).add(len(t))
    starts = [
        start + bytes([len(sizes), *sorted(sizes, reverse=True)]) for start, sizes in sorted(lengths.items())
    ]
    header = MAGIC + struct.pack("<II", len(tokens), len(starts))
    return b"".join([header, bytes(map(len, tokens)), *tokens, bytes(pairs), *starts])


def default_txt_path() -> Path:
    import rwkv  # BlinkDL's package ships the text file next to its tokenizer

    return Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else default_txt_path()
    BIN_PATH.write_bytes(pack(parse_vocab_txt(src)))
    print(f"wrote {BIN_PATH} from {src}")
