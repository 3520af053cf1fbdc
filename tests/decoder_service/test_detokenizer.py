"""Incremental detokenization: multi-byte characters, stop strings held back and cut."""

from __future__ import annotations

import random

import pytest

from decoder_service.engine.detokenizer import IncrementalDetokenizer
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
