"""Streamed text deltas: exact concatenation, no broken UTF-8, stop strings across tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine import Engine, SamplingParams, StoppingCriteria
from tandem.engine.host.detokenizer import IncrementalDetokenizer, decoder_of

MULTIBYTE = "héllo wörld ☃ 中文字符 日本語 한국어 😀🚀👩‍💻 🇫🇷 ∑∫ €"
texts = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(MULTIBYTE)),
        st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\ufffd"),
    ),
    min_size=1,
    max_size=60,
)


def _stream(tokenizer, ids, stops=None):
    detok = IncrementalDetokenizer(tokenizer, stops)
    deltas = []
    for token in ids:
        detok.push(token)
        if detok.find_stop():
            break
        deltas.append(detok.delta(final=False))
    if detok.stopped_by is None:
        detok.flush()
    deltas.append(detok.delta(final=True))
    return deltas, detok


@settings(max_examples=200, deadline=None)
@given(texts)
def test_text_round_trips_through_deltas(tiny_llama, text) -> None:
    tok = tiny_llama.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas), "an incomplete UTF-8 sequence was emitted"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(3, 511), min_size=1, max_size=40))
def test_arbitrary_ids_concatenate_to_the_full_decode(tiny_llama, ids) -> None:
    tok = tiny_llama.tokenizer
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_held_back_not_broken(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    ids = tok.encode("😀🚀", add_special_tokens=False)
    assert len(ids) > 2  # rare emoji take several byte-level tokens
    deltas, _ = _stream(tok, ids)
    assert all(d in ("", "😀", "🚀", "😀🚀") for d in deltas)


@pytest.mark.parametrize("stop", ["STOP", "wor", "ld S", "中文"])
def test_stop_string_across_token_boundaries_is_trimmed(tiny_llama, stop) -> None:
    tok = tiny_llama.tokenizer
    text = "hello world STOP after 中文 tail"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = _stream(tok, ids, [stop, "never-matches"])
    assert detok.stopped_by == stop
    assert "".join(deltas) == text[: text.index(stop)]


def test_engine_stop_string_and_finish_reasons(engine: Engine) -> None:
    prompt = list(range(30, 50))
    free = engine.generate([prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=24))[0]
    assert free.finish_reason.value in ("length", "eos")
    stop = free.text[5:8]
    assert len(stop) == 3
    cut = engine.generate(
        [prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=24, stop_strings=[stop])
    )[0]
    assert cut.finish_reason.value == "stop_string"
    assert cut.text == free.text[: free.text.index(stop)]
    token = free.token_ids[3]
    by_token = engine.generate(
        [prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=24, stop_token_ids=[token])
    )[0]
    assert by_token.finish_reason.value == "stop_token"
    assert by_token.token_ids == free.token_ids[: free.token_ids.index(token) + 1]
    eos = engine.generate(
        [prompt], SamplingParams(temperature=0, logit_bias={1: 100.0}), StoppingCriteria(max_new_tokens=24)
    )[0]
    assert eos.finish_reason.value == "eos" and eos.token_ids == [1] and eos.text == ""
    held = engine.generate(
        [prompt],
        SamplingParams(temperature=0, logit_bias={1: 100.0}),
        StoppingCriteria(max_new_tokens=6, min_new_tokens=4),
    )[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == 1 and 1 not in held.token_ids[:4]


def test_stop_strings_before_min_new_tokens_do_not_count(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    first = tok.encode("xx STOP yy", add_special_tokens=False)
    second = tok.encode(" and STOP zz", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, ["STOP"])
    for token in first:  # still under min_new_tokens: the engine tells it to ignore these
        detok.push(token)
        detok.ignore_stops_so_far()
    found = False
    for token in second:
        detok.push(token)
        if detok.find_stop():
            found = True
            break
    assert found and detok.text == "xx STOP yy and "


def test_fast_tokenizers_decode_through_their_backend_unless_they_clean_up(tiny_llama) -> None:
    """The tests above compare the streamed text with `tokenizer.decode`: through this path."""
    import copy

    tok = tiny_llama.tokenizer
    assert decoder_of(tok) == tok._tokenizer.decode
    cleaning = copy.copy(tok)
    cleaning.clean_up_tokenization_spaces = True  # transformers rewrites the text: its own decode
    assert decoder_of(cleaning) == cleaning.decode

    class Overriding(type(tok)):  # type: ignore[misc]  # a model's tokenizer with its own decoding (as CodeGen's)
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    overriding = copy.copy(tok)
    overriding.__class__ = Overriding
    assert decoder_of(overriding) == overriding.decode


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's spelling of each byte (GPT-2's printable mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_ids(tok) -> list[int]:
    """The ids of the single-byte tokens of a byte-level BPE vocabulary."""
    vocab = tok.get_vocab()
    return [vocab[c] for c in _byte_chars().values() if c in vocab]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from tandem.engine.model.loader import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"), local_files_only=True)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_special_and_byte_tokens_concatenate_to_the_full_decode(tiny_llama, smollm2_tokenizer, data) -> None:
    """What a client can force (logit_bias, ignore_eos): special tokens and lone bytes mixed
    with ordinary ones, on both tokenizers; the streamed text is the full decode exactly."""
    for tok in (tiny_llama.tokenizer, smollm2_tokenizer):
        pool = tok.all_special_ids + _byte_ids(tok) + list(range(len(tok.get_vocab())))[:2000]
        ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=60))
        deltas, _ = _stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("forced", ["special", "lone byte", "mixed"])
def test_the_window_stays_short_whatever_the_output(smollm2_tokenizer, forced: str) -> None:
    """Each token re-decodes only a few tokens, so a client forcing tokens that add no text
    cannot make detokenization quadratic (the window once grew with every such token)."""
    tok = smollm2_tokenizer
    vocab = tok.get_vocab()
    lone = vocab[_byte_chars()[0x80]]  # a continuation byte alone: never a character
    special = tok.all_special_ids[0]
    ids = {"special": [special], "lone byte": [lone], "mixed": [special, lone, vocab["a"]]}[forced] * 1000
    detok = IncrementalDetokenizer(tok)
    decode, longest = detok._decode, 0

    def counting(window, **kw):
        nonlocal longest
        longest = max(longest, len(window))
        return decode(window, **kw)

    detok._decode = counting
    for token in ids:
        detok.push(token)
        detok.delta(final=False)
    detok.flush()
    assert longest <= 16
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
