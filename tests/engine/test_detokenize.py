"""Incremental detokenization equals decoding everything at once, one token at a time."""

import pytest

from app.engine.detokenize import IncrementalDetokenizer

TEXTS = ["a gripping , funny film", "café crème — naïve ☕ 日本語", "  spaced\n\nlines\tand tabs ", "emoji 👍🏽 done"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decode(tiny_base, text):
    tokenizer = tiny_base.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    pieces.append(detokenizer.finish())
    assert "".join(pieces) == detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)  # a character split over byte tokens waits


def test_a_partial_character_at_the_end_is_flushed_as_a_replacement(tiny_base):
    tokenizer = tiny_base.tokenizer
    ids = tokenizer("☕", add_special_tokens=False).input_ids
    assert len(ids) > 1  # the byte-level tokenizer spells it in several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add(token) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.finish() == tokenizer.decode(ids[:-1]) and detokenizer.text.endswith("\ufffd")


def test_special_tokens_are_skipped(tiny_base):
    tokenizer = tiny_base.tokenizer
    ids = tokenizer("hello there", add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in [ids[0], tokenizer.eos_token_id, *ids[1:]]:
        detokenizer.add(token)
    detokenizer.finish()
    assert detokenizer.text == "hello there"


@pytest.mark.real_model
def test_pieces_add_up_on_the_real_tokenizer(each_real_base):
    tokenizer = each_real_base.tokenizer
    for text in TEXTS + [" leading space", "Sentiment: positive\nReview:"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        detokenizer = IncrementalDetokenizer(tokenizer)
        pieces = [detokenizer.add(token) for token in ids] + [detokenizer.finish()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
