"""Incremental detokenization: multi-byte characters, stop strings held back and cut, and the
byte-level fast path releasing exactly the pieces the decode path does."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from decoder_service.engine.detokenizer import IncrementalDetokenizer, TokenBytes
from models.glm4v.tokenizer_build import build_tokenizer

TEXTS = [
    "图片里有什么？一只猫坐在窗户旁边。",
    "Emoji 🙂🚀 and accents: café, naïve, Zürich — ok.",
    "Mixed ✓ 中文 and English 😀 with numbers 42.",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    pieces = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode_without_broken_characters(tok, text):
    ids = tok.encode(text).ids
    # the byte-level vocabulary splits characters the corpus never saw into several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()
    pieces = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hello").ids + [tok.token_to_id("<|endoftext|>")]
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == "hello"
    kept = "".join(stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids))
    assert kept == "hello<|endoftext|>"


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_cut_and_never_emitted(tok, chunk):
    text = "The answer is 42. Then more text follows here."
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, stop=("42.",))
    pieces = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert detok.stop_string == "42."
    assert "".join(pieces) == "The answer is "
    assert detok.flush() == ""
    assert all("4" not in p for p in pieces)


def test_partial_stop_prefix_is_held_then_released(tok):
    detok = IncrementalDetokenizer(tok, stop=("STOPNOW",))
    released = []
    for token in tok.encode("abc STOP later STOPN end").ids:
        released.append(detok.push([token]))
        # whatever is visible never ends with a prefix of the stop string
        shown = "".join(released)
        assert not any(shown.endswith("STOPNOW"[:k]) for k in range(1, 8))
    assert detok.stop_string is None
    assert "".join(released) + detok.flush() == "abc STOP later STOPN end"


def test_earliest_of_several_stop_strings_wins(tok):
    detok = IncrementalDetokenizer(tok, stop=("world", "lo w"))
    assert "".join(stream(detok, tok.encode("hello world").ids)) == "hel"
    assert detok.stop_string == "lo w"


def test_random_token_streams_match_full_decode(tok):
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(IncrementalDetokenizer(tok), ids)) == tok.decode(ids)


def test_uneven_chunks_hold_partial_characters_and_rejoin(tok):
    # chunks of 1..3 tokens end inside multi-byte characters now and then; a held character
    # must come out whole once its last byte arrives, and nothing may be lost or repeated
    rng = random.Random(1)
    for text in TEXTS:
        ids = tok.encode(text).ids
        for _ in range(10):
            detok = IncrementalDetokenizer(tok)
            pieces, i = [], 0
            while i < len(ids):
                n = rng.randint(1, 3)
                pieces.append(detok.push(ids[i : i + n]))
                i += n
            pieces.append(detok.flush())
            assert "".join(pieces) == text
            assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizers_sharing_single_token_texts_stream_the_same(tok, skip):
    rng = random.Random(2)
    vocab = tok.get_vocab_size()
    shared: dict[int, str] = {}
    for text in TEXTS:
        ids = tok.encode(text).ids + [rng.randrange(vocab) for _ in range(10)]
        alone = stream(IncrementalDetokenizer(tok, skip), ids)
        assert stream(IncrementalDetokenizer(tok, skip, single_texts=shared), ids) == alone
        stopped = IncrementalDetokenizer(tok, skip, stop=("zz",), single_texts=shared)
        assert "".join(stream(stopped, ids)) == tok.decode(ids, skip_special_tokens=skip)
    assert shared and all(tok.decode([i], skip_special_tokens=skip) == t for i, t in shared.items())


@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_string_found_and_prefixes_released_deep_into_a_long_output(tok, chunk):
    # thousands of characters in, near-misses of the stop string are held and then shown, and
    # the real one is still cut; the detokenizer keeps only a bounded tail of the text
    filler = "".join(f"line {i}: STOPNO then on. " for i in range(300))
    text = filler + "the end STOPNOW never shown"
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, stop=("STOPNOW",))
    pieces, longest = [], 0
    for i in range(0, len(ids), chunk):
        pieces.append(detok.push(ids[i : i + chunk]))
        longest = max(longest, len(detok._text))
    assert detok.stop_string == "STOPNOW"
    assert "".join(pieces) == filler + "the end "
    assert len(filler) > 4 * longest


# ---- the byte-level fast path (TokenBytes): the same pieces as decoding windows of ids ----

# Byte sequences that UTF-8 decoders disagree on when they are careless: truncated characters,
# lone continuation bytes, overlongs, surrogates, code points past U+10FFFF, bytes never valid.
TRICKY = [
    *(s.encode() for s in ("é", "中", "🙂", "🚀", "👩‍💻", "ü", "\u2028", "\ufffd", "a b")),
    b"\x80",
    b"\xbf",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xe0\x9f\xbf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf0\x80\x80\x80",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80",
    b"\xff",
    b"\xfe",
    b"\xe4\xb8",
    b"\xf0\x9f\x99",
    b"\xf0\x9f",
    b"\xc3",
    b"\xe2\x82",
]


def gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel alphabet, in order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(rest)) for b in range(256)]


def random_bytes(rng: random.Random, n: int) -> bytes:
    parts = [rng.choice(TRICKY) if rng.random() < 0.6 else bytes([rng.randrange(256)])]
    while len(parts) < n:
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(TRICKY))
        elif r < 0.7:
            parts.append(rng.choice(TEXTS).encode()[: rng.randrange(1, 12)])
        else:
            parts.append(bytes([rng.randrange(256)]))
    return b"".join(parts)


def byte_level_tokenizer(add_prefix_space: bool) -> tuple[Tokenizer, int]:
    """A byte-level BPE whose vocabulary covers every raw byte, plus multi-byte tokens cut at
    random places (mid-character, invalid, emoji, CJK) and added tokens, special or not,
    inside and outside the byte alphabet. Returns it and its model vocabulary size."""
    rng = random.Random(7)
    chars = gpt2_byte_chars()
    vocab = {c: b for b, c in enumerate(chars)}
    while len(vocab) < 1500:
        vocab.setdefault(
            "".join(chars[b] for b in random_bytes(rng, rng.randint(1, 3))[:6]), len(vocab)
        )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel(add_prefix_space=add_prefix_space)
    tok.add_special_tokens(["<|end|>", "<|sp ace|>", "Ġlead", "中文<|x|>", chars[0xF0]])
    tok.add_tokens(["<tool>", "naïve", "🙂 ok", "Ãģ"])
    return tok, len(vocab)


@pytest.fixture(scope="module", params=[True, False], ids=["prefix_space", "no_prefix_space"])
def byte_tok(request):
    return byte_level_tokenizer(request.param)


@pytest.fixture(scope="module")
def tiny_tok(tiny_ckpt_45):
    return Tokenizer.from_file(str(tiny_ckpt_45 / "tokenizer.json"))  # as the service loads it


def test_byte_level_decoding_is_lossy_utf8_of_the_token_bytes(byte_tok):
    # The claim the fast path rests on: the tokenizer's decode (Rust) is Python's
    # bytes.decode("utf-8", "replace") of the concatenated token bytes, U+FFFD for U+FFFD.
    tok, _ = byte_tok
    rng = random.Random(3)
    for _ in range(300):
        raw = random_bytes(rng, rng.randrange(1, 12))
        # (the token of byte 0xF0 is also a special token here: kept, it is that byte)
        assert tok.decode(list(raw), skip_special_tokens=False) == raw.decode("utf-8", "replace")


def compare_streams(tok, token_bytes, ids, rng, skip, stop):
    """Stream ``ids`` in random chunks through both paths; the pieces must be identical."""
    slow = IncrementalDetokenizer(tok, skip, stop)
    fast = IncrementalDetokenizer(tok, skip, stop, token_bytes=token_bytes)
    i = 0
    while i < len(ids):
        n = rng.randint(1, 4)
        assert fast.push(ids[i : i + n]) == slow.push(ids[i : i + n]), ids
        assert fast.stop_string == slow.stop_string
        i += n
    assert fast.flush() == slow.flush()
    return slow


@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_releases_the_same_pieces_on_a_raw_byte_vocabulary(byte_tok, skip):
    tok, model_size = byte_tok
    token_bytes = TokenBytes.of(tok)
    assert token_bytes is not None
    size = tok.get_vocab_size(with_added_tokens=True)
    rng = random.Random(4)
    for case in range(400):
        ids = [
            rng.randrange(size, size + 3)  # past the vocabulary (a padded lm head): nothing
            if rng.random() < 0.03
            else rng.randrange(model_size, size)  # added tokens mid-stream
            if rng.random() < 0.15
            else rng.randrange(256)  # single bytes: any sequence, valid or not
            if rng.random() < 0.5
            else rng.randrange(model_size)
            for _ in range(rng.randrange(1, 40))
        ]
        full = tok.decode(ids, skip_special_tokens=skip)
        # a stop string cut from the text itself, so that it matches now and then
        start = rng.randrange(max(len(full), 1))
        stop = (full[start : start + rng.randint(1, 3)], "🙂") if case % 3 == 0 and full else ()
        slow = compare_streams(tok, token_bytes, ids, rng, skip, stop)
        if not stop:
            assert slow.stop_string is None


@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_releases_the_same_pieces_on_the_tiny_checkpoint_tokenizer(tiny_tok, skip):
    token_bytes = TokenBytes.of(tiny_tok)
    assert token_bytes is not None  # GLM's decoder is exactly ByteLevel, so the service uses it
    size = tiny_tok.get_vocab_size(with_added_tokens=True)
    specials = [tiny_tok.token_to_id(t) for t in ("<|endoftext|>", "<think>", "<|user|>")]
    rng = random.Random(5)
    for case in range(300):
        ids: list[int] = []
        while len(ids) < 30:
            r = rng.random()
            if r < 0.3:
                ids += tiny_tok.encode(rng.choice(TEXTS)).ids[: rng.randrange(1, 20)]
            elif r < 0.45:
                ids.append(rng.choice(specials))
            else:
                ids.append(rng.randrange(size))
        stop = ("。", "🙂", "think") if case % 2 else ()
        compare_streams(tiny_tok, token_bytes, ids, rng, skip, stop)


def test_fast_path_never_calls_decode(tiny_tok):
    class NoDecode:  # the tokenizer as the fast path may use it: look-ups only
        decoder = tiny_tok.decoder

        def __getattr__(self, name):
            return getattr(tiny_tok, name)

        def decode(self, *args, **kwargs):
            raise AssertionError("decode called")

    ids = tiny_tok.encode(TEXTS[1] + TEXTS[0]).ids + [tiny_tok.token_to_id("<|endoftext|>")]
    detok = IncrementalDetokenizer(
        NoDecode(), stop=("Zürich",), token_bytes=TokenBytes.of(NoDecode())
    )
    assert "".join(stream(detok, ids)) == TEXTS[1][: TEXTS[1].index("Zürich")]


def test_other_decoders_keep_the_decode_path(tiny_tok):
    wrapped = Tokenizer.from_str(tiny_tok.to_str())
    wrapped.decoder = decoders.Sequence([decoders.ByteLevel()])
    assert TokenBytes.of(wrapped) is None
    wrapped.decoder = decoders.Metaspace()
    assert TokenBytes.of(wrapped) is None
    assert TokenBytes.of(object()) is None  # no decoder at all
