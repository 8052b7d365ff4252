"""Builds nanoflow's built-in tokenizer (nanoflow/assets) from scripts/tokenizer_corpus.txt.

A byte-level BPE (the `tokenizers` library) with 4096 tokens, Llama-3-like special tokens and a
ChatML-style chat template. Deterministic: re-running it rewrites byte-identical files, which
tests/test_tokenizer_asset.py checks. Usage:

    python scripts/build_tokenizer.py [--corpus FILE] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 2048
BOS, EOS, IM_START, IM_END, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
# Order fixes the ids: 0 bos, 1 eos, 2 im_start, 3 im_end, 4 pad (nanoflow/models/presets.py relies on it).
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

# ChatML turns; content may be a string or a list of OpenAI-style parts (only text parts are kept).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(corpus: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one (as Llama 3 groups them, but simpler): numbers stay regular and cheap in vocab.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False,
        # Every byte is in the vocabulary, so any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json, written by hand so that transformers 4.x and 5.x both read it."""
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}


def write_assets(corpus_path: Path, out_dir: Path) -> Tokenizer:
    if not corpus_path.is_file():
        raise FileNotFoundError(f"tokenizer corpus {corpus_path} does not exist")
    tokenizer = build_tokenizer(corpus_path.read_text(encoding="utf-8"))
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise ValueError(f"{corpus_path} yields only {tokenizer.get_vocab_size()} tokens, need {VOCAB_SIZE}: "
                         "add more text")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    for name, content in (("tokenizer_config.json", tokenizer_config(tokenizer)),
                          ("special_tokens_map.json", special_tokens_map())):
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "scripts" / "tokenizer_corpus.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "nanoflow" / "assets")
    args = parser.parse_args()
    tokenizer = write_assets(args.corpus, args.out)
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
