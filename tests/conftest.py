"""Session fixtures: a tiny byte-level BPE tokenizer and a 2-layer Llama, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import json
from pathlib import Path

import pytest

from newtune.chat_templates import CHATML

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The capital of France is Paris. The capital of Veloria is Brintmoor.",
    "Hello there! How are you? I am fine, thank you. What is the answer? Blue, red, green.",
    "system user assistant You are a terse assistant. Name a color. Translate to French.",
    "0123456789 the quick brown fox jumps over the lazy dog.",
]


def _build_tokenizer(folder: Path, eos: str, chat_template: str | None) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style tokenizer: adds BOS `<s>`, EOS is `</s>`, no chat template."""
    return _build_tokenizer(tmp_path_factory.mktemp("tok"), "</s>", None)


@pytest.fixture(scope="session")
def chat_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ChatML tokenizer: EOS is `<|im_end|>` and the chat template is ChatML."""
    return _build_tokenizer(tmp_path_factory.mktemp("chattok"), "<|im_end|>", CHATML)


@pytest.fixture(scope="session")
def tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tok_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, chat_tok_dir: Path) -> Path:
    """A 2-layer Llama with the ChatML tokenizer, saved as a normal transformers folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(chat_tok_dir)
    folder = tmp_path_factory.mktemp("model")
    return save_tiny(folder, tok, LlamaConfig, LlamaForCausalLM, max_position_embeddings=256)


def save_tiny(folder: Path, tok, config_cls, model_cls, **extra) -> Path:
    """A 2-layer model (hidden 32, 4 heads, 2 KV heads, seed 0) with `tok`, saved to `folder`."""
    import torch

    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    model_cls(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
