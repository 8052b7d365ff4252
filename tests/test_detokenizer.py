import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from nanoflow.engine.detokenizer import IncrementalDetokenizer, check_stop_token
from nanoflow.sampling_params import SamplingParams

CORPUS = ["hello world, this is a test.", "the quick brown fox jumps over the lazy dog",
          "stop here and there", "café au lait is nice", "The END of the story"] * 5
MULTIBYTE = "日本語 🙂 café naïve"


def train(pre_tokenizer, decoder, vocab_size=330) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE: characters missing from the corpus are split into single-byte tokens."""
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


@pytest.fixture(scope="module")
def sp_tokenizer():
    """SentencePiece-style (Metaspace): a decode that starts at a word drops its leading space."""
    return train(pre_tokenizers.Metaspace(), decoders.Metaspace())


class SlowTokenizer:
    """Only the generic `decode` API (no Rust backend): exercises the fallback path."""

    def __init__(self, fast):
        self.fast = fast

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=clean_up_tokenization_spaces)


def stream(tokenizer, text, params=None, prompt="hello world"):
    """Feeds the tokens of `text` one at a time; returns (detokenizer, visible texts, stop string)."""
    params = params or SamplingParams()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), params)
    visible, stop = [], None
    for token_id in tokenizer.encode(text):
        stop = detok.append([token_id])
        visible.append(detok.visible_text)
        if stop is not None:
            break
    return detok, visible, stop


def assert_streams_monotonically(visible, final):
    for before, after in zip(visible, visible[1:] + [final]):
        assert after.startswith(before)


def test_multibyte_characters_are_split_across_tokens(tokenizer):
    # Guards the next test: these characters really are several byte tokens each.
    ids = tokenizer.encode("🙂")
    assert len(ids) == 4 and all(tokenizer.decode([i]) == "\ufffd" for i in ids)


@pytest.mark.parametrize("slow", [False, True])
def test_incremental_text_equals_full_decode(tokenizer, slow):
    text = "the quick " + MULTIBYTE + " fox, the lazy dog."
    tok = SlowTokenizer(tokenizer) if slow else tokenizer
    detok = IncrementalDetokenizer(tok, tokenizer.encode("hello"), SamplingParams())
    seen = []
    for token_id in tokenizer.encode(text):
        assert detok.append([token_id]) is None
        seen.append(detok.output_text)
        assert "\ufffd" not in detok.output_text  # never half a character
    assert detok.output_text == text
    assert_streams_monotonically(seen, text)
    assert detok.num_output_tokens == len(tokenizer.encode(text))


def test_partial_character_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"), SamplingParams())
    ids = tokenizer.encode("a🙂")
    detok.append(ids[:3])
    assert detok.output_text == "a"
    detok.append(ids[3:])
    assert detok.output_text == "a🙂"


def test_appending_many_tokens_at_once_matches_one_by_one(tokenizer):
    text = "stop here " + MULTIBYTE
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), SamplingParams())
    detok.append(tokenizer.encode(text))
    assert detok.output_text == text


def test_prompt_context_keeps_leading_space(sp_tokenizer):
    prompt_ids = sp_tokenizer.encode("hello")
    output_ids = sp_tokenizer.encode("hello world, this is")[len(prompt_ids):]
    assert sp_tokenizer.decode(output_ids) == "world, this is"  # what a context-free decode gives
    detok = IncrementalDetokenizer(sp_tokenizer, prompt_ids, SamplingParams())
    for token_id in output_ids:
        detok.append([token_id])
    assert detok.output_text == " world, this is"


def test_stop_string_across_token_boundaries(tokenizer):
    text = "The END of the story"
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    assert pieces[pieces.index(" of") - 1:pieces.index(" the") + 1] == [" END", " of", " the"]
    detok, visible, stop = stream(tokenizer, text, SamplingParams(stop=["xyz", "END of the"]))
    assert stop == "END of the" and detok.stopped and detok.stop_str == "END of the"
    assert detok.output_text == "The "
    assert detok.visible_text == "The "  # the full text once stopped, no hold-back
    assert_streams_monotonically(visible, detok.output_text)


def test_include_stop_str_in_output(tokenizer):
    params = SamplingParams(stop=["D of t"], include_stop_str_in_output=True)
    detok, visible, stop = stream(tokenizer, "The END of the story", params)
    assert stop == "D of t" and detok.output_text == "The END of t"
    assert_streams_monotonically(visible, detok.output_text)


def test_stop_string_inside_a_token_cuts_the_token(tokenizer):
    text = "the quick brown fox"
    assert " brown" in [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    detok, _, stop = stream(tokenizer, text, SamplingParams(stop=["ro"]))
    assert stop == "ro" and detok.output_text == "the quick b"


def test_stop_string_is_never_streamed_half_way(tokenizer):
    params = SamplingParams(stop=["lazy dog!"])  # never matches: "lazy dog." is generated
    text = "the quick brown fox jumps over the lazy dog."
    detok, visible, stop = stream(tokenizer, text, params)
    assert stop is None and not detok.stopped
    for shown in visible:
        assert "lazy" not in shown  # "lazy dog" could still become "lazy dog!"
    assert detok.visible_text == text[: len(text) - 8]
    assert detok.output_text == text  # final text once the request ends
    assert_streams_monotonically(visible, detok.output_text)


def test_earliest_stop_string_wins(tokenizer):
    detok, _, stop = stream(tokenizer, "hello world, this is a test.", SamplingParams(stop=["test", "this", "xyz"]))
    assert stop == "this" and detok.output_text == "hello world, "
    # Both complete with the token " brown": the one that starts first wins, whatever the list order.
    text = "the quick brown fox"
    assert " brown" in [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    detok, _, stop = stream(tokenizer, text, SamplingParams(stop=["own", "bro"]))
    assert stop == "bro" and detok.output_text == "the quick "


def test_min_tokens_delays_stop_strings(tokenizer):
    text = "stop here and there"
    ids = tokenizer.encode(text)
    assert [tokenizer.decode([i]) for i in ids[:3]] == ["stop", " here", " and"]
    detok, _, stop = stream(tokenizer, text, SamplingParams(stop=["here"], min_tokens=1))
    assert stop == "here" and detok.output_text == "stop "
    # Like vLLM, a stop string is looked for only in text added after min_tokens tokens:
    # " here" is the 2nd token, so the match is the "here" of " there".
    detok, _, stop = stream(tokenizer, text, SamplingParams(stop=["here"], min_tokens=2))
    assert stop == "here" and detok.output_text == "stop here and t"
    detok, _, stop = stream(tokenizer, text, SamplingParams(stop=["here"], min_tokens=len(ids), max_tokens=None))
    assert stop is None and detok.output_text == text


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("hello") + [tokenizer.eos_token_id] + tokenizer.encode(" world")
    skipped = IncrementalDetokenizer(tokenizer, [0], SamplingParams())
    skipped.append(ids)
    assert skipped.output_text == "hello world"
    kept = IncrementalDetokenizer(tokenizer, [0], SamplingParams(skip_special_tokens=False))
    kept.append(ids)
    assert kept.output_text == "hello</s> world"


@pytest.mark.parametrize("include, want", [(False, "hello"), (True, "hello fox")])
def test_text_of_a_stop_token(tokenizer, include, want):
    fox = tokenizer.encode(" fox")
    assert len(fox) == 1
    params = SamplingParams(stop_token_ids=fox, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [0], params)
    detok.append(tokenizer.encode("hello"))
    assert detok.append(fox, stopped_by_token=True) is None
    assert detok.output_text == want and detok.visible_text == want


def test_append_after_stop_raises(tokenizer):
    detok, _, _ = stream(tokenizer, "The END of the story", SamplingParams(stop="END"))
    with pytest.raises(RuntimeError):
        detok.append(tokenizer.encode(" more"))


EOS = 1


@pytest.mark.parametrize("token, params, n, want", [
    (EOS, SamplingParams(), 1, "stop"),
    (5, SamplingParams(), 1, None),
    (EOS, SamplingParams(ignore_eos=True), 1, None),
    (7, SamplingParams(stop_token_ids=[7]), 1, "stop"),
    (7, SamplingParams(stop_token_ids=[7], ignore_eos=True), 3, "stop"),
    (EOS, SamplingParams(min_tokens=3), 2, None),
    (EOS, SamplingParams(min_tokens=3), 3, "stop"),
    (7, SamplingParams(stop_token_ids=[7], min_tokens=3), 2, None),
    (9, SamplingParams(), 1, "stop"),  # any of several EOS ids
])
def test_check_stop_token(token, params, n, want):
    assert check_stop_token(token, params, [EOS, 9], n) == want


def test_check_stop_token_accepts_a_single_eos_id():
    assert check_stop_token(EOS, SamplingParams(), EOS, 1) == "stop"
