"""The built-in tokenizer (nanoflow/assets): reproducible build, offline loading, round trip, chat template."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from nanoflow.models.loader import default_model_dir
from nanoflow.models.presets import DEFAULT_BOS_ID, DEFAULT_EOS_ID, DEFAULT_IM_END_ID, DEFAULT_VOCAB_SIZE, PRESETS

ROOT = Path(__file__).resolve().parent.parent
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)


def test_build_script_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tokenizer.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ASSET_FILES:  # parsed, so a tokenizers release that only re-indents its JSON still passes
        built, shipped = (json.loads((d / name).read_text(encoding="utf-8")) for d in (tmp_path, default_model_dir()))
        assert built == shipped, f"{name} is stale: re-run scripts/build_tokenizer.py"


def test_special_tokens_match_the_default_preset(tok):
    assert tok.is_fast
    assert len(tok) == DEFAULT_VOCAB_SIZE == PRESETS["default"].vocab_size
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == DEFAULT_BOS_ID
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id == DEFAULT_EOS_ID
    assert tok.convert_tokens_to_ids("<|im_end|>") == DEFAULT_IM_END_ID
    assert PRESETS["default"].bos_token_id == DEFAULT_BOS_ID
    assert PRESETS["default"].eos_token_ids == (DEFAULT_EOS_ID, DEFAULT_IM_END_ID)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "héllo 世界 🚀",
    "  leading and  double  spaces, trailing \n\n\ttabs\t",
    "def f(x):\n    return x ** 2  # 1234567890",
    "Привет, мир. Καλημέρα. مرحبا. नमस्ते. 안녕하세요.",
    "\x00\x7f control bytes and a lone \u200b zero-width space",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == DEFAULT_BOS_ID and DEFAULT_BOS_ID not in ids[1:]
    assert max(ids) < DEFAULT_VOCAB_SIZE
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_common_words_are_single_tokens(tok):
    ids = tok.encode(" the model and the", add_special_tokens=False)
    assert len(ids) == 4


def test_special_tokens_in_text_are_atomic(tok):
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [DEFAULT_IM_END_ID]


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    without = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert prompt == without + "<|im_start|>assistant\n"
    # The template adds the bos itself: the rendered prompt is tokenized without special tokens.
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == DEFAULT_BOS_ID and ids.count(DEFAULT_BOS_ID) == 1
    assert ids.count(DEFAULT_IM_END_ID) == 2


def test_chat_template_accepts_content_parts(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}]
    plain = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(parts, tokenize=False) == tok.apply_chat_template(plain, tokenize=False)
