"""Tokenizers: exact parity with BlinkDL's World tokenizer, HF tokenizer.json, streaming, choice."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_cli.data.build_world_vocab import BIN_PATH, default_txt_path, pack, parse_vocab_txt
from rwkv_cli.errors import TokenizerError
from rwkv_cli.tokenizer import HFTokenizer, WorldTokenizer, load_tokenizer, load_tokenizer_for


def cases(n: int):
    """Hypothesis settings: n examples, no deadline (CI machines are slow and shared)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


SAMPLES = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé naïve café — «quotes» „Anführung“ ß ẞ Ø å",
    "你好，世界！我们今天去公园散步，然后吃了饺子。",
    "日本語のテキストとカタカナ、ひらがな。한국어 문장입니다.",
    "مرحبا بالعالم، هذه جملة عربية. שלום עולם",
    "Привет, мир! Ελληνικά κείμενα. हिन्दी पाठ। ไทย ภาษา",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ flags and ZWJ",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0359\u0353",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return {'a': [1, 2, 3]}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n#include <stdio.h>\r\n",
    "   \n\n\n\t\t  \u3000 \u00a0 " + " " * 300 + "\n" * 50 + "x",
    "User: hi\n\nAssistant: <think>\n</think>\nHello!\n\nUser: 1+1=?\n\nAssistant:",
    "\x00\x01\x7f\ufffd\U0010ffff\ud7ff\ue000",
    "a" * 1000 + "ab" * 500 + "-" * 200 + "#" * 129,
]


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def ref():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(default_txt_path()))


# ------------------------------------------------------------------------------ World: parity


def test_packed_vocabulary_is_the_reference_text_file():
    tokens = parse_vocab_txt(default_txt_path())
    assert len(tokens) == 65529 and max(map(len, tokens)) == 128
    assert tokens[:256] == [bytes([b]) for b in range(256)]  # byte b is id b + 1
    assert pack(tokens) == BIN_PATH.read_bytes(), "regenerate with rwkv_cli/data/build_world_vocab.py"


@pytest.mark.parametrize(
    "text, ids",
    [
        ("\n", [11]),
        ("\n\n", [261]),
        ("\n\n\n", [3328]),
        (" ", [33]),
        ("User: hi\n\nAssistant:", [24281, 59, 4571, 261, 5585, 41693, 59]),
        ("Assistant: <think", [5585, 41693, 59, 295, 35762]),
        ("<think>\n</think>", [61, 35762, 63, 11, 754, 35762, 63]),
        ("System:", [40812, 59]),
    ],
)
def test_known_ids(world, text, ids):
    assert world.encode(text) == ids
    assert world.decode(ids) == text


def test_every_vocabulary_entry_alone(world, ref):
    ours = [world.encode_bytes(t) for t in world.tokens]
    theirs = [ref.encodeBytes(t) for t in world.tokens]
    assert ours == theirs
    assert ours == [[i] for i in range(1, 65530)]
    assert [world.decode_bytes(i) for i in ours] == world.tokens


def test_token_pairs_across_boundaries(world, ref):
    """Neighbouring tokens glued together: where greedy matching must back off or run on."""
    toks = world.tokens
    glued = [toks[i] + toks[(i * 7919 + 13) % len(toks)] for i in range(0, len(toks), 3)]
    assert [world.encode_bytes(g) for g in glued] == [ref.encodeBytes(g) for g in glued]


@pytest.mark.parametrize("text", SAMPLES)
def test_scripts_code_and_whitespace(world, ref, text):
    ids = world.encode(text)
    assert ids == ref.encode(text)
    assert world.decode(ids) == text


def test_long_document(world, ref):
    import rwkv_cli.tokenizer as module

    with open(module.__file__, encoding="utf-8") as f:
        doc = "\n\n".join([f.read(), *SAMPLES] * 4)
    ids = world.encode(doc)
    assert ids == ref.encode(doc)
    assert world.decode(ids) == doc
    assert world.encode(doc) == ids  # the second pass runs from the piece cache


def test_results_do_not_depend_on_the_cache(ref):
    tok = WorldTokenizer()
    tok._CACHE_LIMIT, tok._CACHE_MAX_PIECE = 3, 1_000_000
    for text in SAMPLES * 2:
        assert tok.encode(text) == ref.encode(text)
    assert len(tok._cache) <= 3


@cases(1500)
@given(st.text(max_size=40))
def test_random_text(world, ref, text):
    ids = world.encode(text)
    assert ids == ref.encode(text)
    assert world.decode(ids) == text


# Characters that meet in tokens in many ways: greedy matching must back off correctly.
_TRICKY = st.sampled_from(list(" \n\t\r.,:'\"-_#=*/()<>aeinstTAHI01你好的一是😀é\u0301\u00a0"))


@cases(1000)
@given(st.text(_TRICKY, max_size=60))
def test_random_text_from_tricky_characters(world, ref, text):
    ids = world.encode(text)
    assert ids == ref.encode(text)
    assert world.decode(ids) == text


@cases(1000)
@given(st.binary(max_size=40))
def test_random_bytes(world, ref, data):
    ids = world.encode_bytes(data)
    assert ids == ref.encodeBytes(data)
    assert world.decode_bytes(ids) == data


@cases(800)
@given(st.lists(st.integers(1, 65529), max_size=10))
def test_random_token_soup(world, ref, ids):
    data = world.decode_bytes(ids)
    assert world.encode_bytes(data) == ref.encodeBytes(data)


def test_decode_rejects_ids_outside_the_vocabulary(world):
    import numpy as np
    import torch

    assert world.decode([0, 65530, 65535]) == ""  # end of text and padding: ids a model can emit
    assert world.decode([0, 24281, 65535]) == "User"
    for bad, ids in [(-1, [24281, -1]), (65536, [65536]), (99999999, [24281, 59, 99999999, 33]),
                     (10**26, [10**26]), (70000, torch.tensor([24281, 70000]))]:
        with pytest.raises(TokenizerError, match=rf"^token id {bad} is outside the vocabulary \[0, 65536\)$"):
            world.decode(ids)
        with pytest.raises(TokenizerError):
            world.decode_bytes(ids)
    assert world.detokenizer().push(70000) == ""  # streaming (sampled ids) is not checked
    assert world.decode(np.array([24281, 59])) == "User:"
    assert world.decode(torch.tensor([24281, 59])) == "User:"
    assert world.decode([230]) == "\ufffd"  # a lone lead byte is invalid UTF-8
    with pytest.raises(TypeError):
        world.decode(["x"])


# ---------------------------------------------------------------------------------- Streaming


def _stream(tok, ids) -> list[str]:
    d = tok.detokenizer()
    return [d.push(i) for i in ids] + [d.flush()]


def test_world_stream_holds_back_split_characters(world):
    ni = [b + 1 for b in "你".encode()]  # three single-byte tokens
    assert _stream(world, ni) == ["", "", "你", ""]
    assert _stream(world, [24281] + ni[:2]) == ["User", "", "", "\ufffd"]  # incomplete at the end
    assert _stream(world, [0xFF + 1, 34]) == ["\ufffd", "!", ""]  # invalid at once: no waiting


@cases(400)
@given(st.binary(max_size=40))
def test_world_stream_equals_whole_decode(world, data):
    for ids in ([b + 1 for b in data], world.encode_bytes(data)):
        assert "".join(_stream(world, ids)) == data.decode("utf-8", errors="replace")


@cases(400)
@given(st.text(max_size=30))
def test_world_stream_never_emits_replacement_for_valid_text(world, text):
    ids = [b + 1 for b in text.encode()]  # worst case: one byte per token
    parts = _stream(world, ids)
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts) or "\ufffd" in text


# ----------------------------------------------------------------------------- Hugging Face


def train_tokenizer_json(path, vocab_size=320, kind="bytelevel"):
    """A tiny tokenizer.json trained here (no downloads); byte-level BPE like GPT-NeoX's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<|padding|>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: characters, "▁" for spaces, unknown characters as <unk>
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        special, alphabet = special + ["<unk>"], []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(SAMPLES * 3, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(train_tokenizer_json(tmp_path_factory.mktemp("hf") / "tokenizer.json"))


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_round_trip(hf, text):
    assert hf.decode(hf.encode(text)) == text


def test_hf_interface(hf):
    assert hf.eos_id == 0 and 256 < hf.vocab_size <= 320
    assert hf.decode([0, 1, 10_000, 50303]) == "<|endoftext|><|padding|>"  # unknown ids: nothing
    assert hf.encode("a<|endoftext|>") == hf.encode("a") + [0]  # as the reference pipeline does
    with pytest.raises(TokenizerError, match=r"token id -1 is outside the vocabulary \[0, "):
        hf.decode([-1])
    with pytest.raises(TokenizerError, match=rf"token id {10**20} is outside the vocabulary"):
        hf.decode([5, 10**20])  # past the u32 ids of the Rust side


def test_hf_stream_holds_back_split_characters(hf):
    ids = hf.encode("a🦀b")  # a rare character: several byte tokens
    assert len(ids) > 3
    parts = _stream(hf, ids)
    assert "".join(parts) == "a🦀b"
    assert "" in parts  # held back while the character was incomplete
    assert any("🦀" in p for p in parts)  # then emitted whole
    assert all("\ufffd" not in p for p in parts)


@cases(300)
@given(st.text(max_size=30))
def test_hf_stream_equals_whole_decode(hf, text):
    ids = hf.encode(text)
    parts = _stream(hf, ids)
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts) or "\ufffd" in text


def test_stream_with_a_non_byte_level_tokenizer(tmp_path):
    tok = HFTokenizer(train_tokenizer_json(tmp_path / "tokenizer.json", 200, kind="metaspace"))
    for text in SAMPLES[1:5]:
        ids = tok.encode(text)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_cost_does_not_grow_with_length(hf):
    calls = []
    d = hf.detokenizer()
    decode = d._decode
    d._decode = lambda ids: calls.append(len(ids)) or decode(ids)
    for i in hf.encode("many words in a row " * 200):
        d.push(i)
    assert max(calls) <= 16


# ---------------------------------------------------------------------------------- Choosing


def test_choice_by_vocabulary_size(tmp_path):
    ckpt = tmp_path / "RWKV-4-Pile-whatever.pth"  # names never decide
    assert load_tokenizer_for(ckpt, 65536).name == "world"
    with pytest.raises(TokenizerError, match="12345.*tokenizer.json"):
        load_tokenizer_for(ckpt, 12345)


def test_tokenizer_json_beside_the_checkpoint_wins(tmp_path):
    train_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer_for(tmp_path / "model.pth", 65536)
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("hi there")) == "hi there"
    with pytest.raises(TokenizerError, match="only 100 rows"):
        load_tokenizer_for(tmp_path / "model.pth", 100)


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a usable tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing.json")


def write_hf_cache(hub_dir, repo: str, filename: str, source) -> None:
    """A real huggingface_hub cache entry: blobs/, snapshots/<rev>/ and refs/main."""
    folder = hub_dir / f"models--{repo.replace('/', '--')}"
    rev, etag = "0123456789abcdef0123456789abcdef01234567", "feedbeef" * 5
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / etag).write_bytes(source.read_bytes())
    (folder / "snapshots" / rev).mkdir(parents=True)
    (folder / "snapshots" / rev / filename).symlink_to(f"../../blobs/{etag}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache for this test (huggingface_hub reads its cache path when it is imported,
    so point the imported constant there too)."""
    import huggingface_hub.constants as constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.mark.parametrize("rows", [50277, 50304])
def test_gpt_neox_from_the_hf_cache(hf_cache, tmp_path, rows):
    write_hf_cache(
        hf_cache, "EleutherAI/gpt-neox-20b", "tokenizer.json", train_tokenizer_json(tmp_path / "t.json")
    )
    tok = load_tokenizer_for(tmp_path / "sub" / "model.pth", rows)
    assert tok.name == "gpt-neox-20b" and tok.decode(tok.encode("naïve café")) == "naïve café"
    assert tok.decode([rows - 1]) == ""  # padding rows decode to nothing


def test_gpt_neox_offline_and_not_cached(hf_cache, tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer_for(tmp_path / "model.pth", 50277)
    msg = str(e.value)
    assert "EleutherAI/gpt-neox-20b" in msg and "run once online" in msg and "\n" not in msg
