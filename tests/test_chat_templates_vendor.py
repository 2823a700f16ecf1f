"""Vendor chat templates of Axolotl's `chat_template` names: exact renders and label masks."""

from __future__ import annotations

import pytest
import yaml

from newtune.chat_templates import NAMED_TEMPLATES, VENDOR_TEMPLATES, content_only_printed
from newtune.config.schema import DatasetEntry
from newtune.data.strategies import get_strategy
from newtune.data.tokenize import IGNORE_INDEX, Engine
from tests.conftest import write_jsonl
from tests.test_cli import ALPACA, cli, make_config

M = IGNORE_INDEX
CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
]

# name -> (render of CONVERSATION, render of its first two messages with the generation
# prompt); the tiny tokenizer's BOS is `<s>` and its EOS `</s>`.
RENDERS = {
    "llama4": (
        "<s><|header_start|>system<|header_end|>\n\nBe terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nName a color.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nBlue.<|eot|>",
        "<s><|header_start|>system<|header_end|>\n\nBe terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nName a color.<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n",
    ),
    "qwen_25": (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n",
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "qwen3": (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>\n",
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "qwen3_5": (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>\n",
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
    ),
    "falcon_h1": (
        "<s><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n",
        "<s><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "cohere": (
        "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be terse.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Name a color.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Blue.<|END_OF_TURN_TOKEN|>",
        "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be terse.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Name a color.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    ),
    "deepseek_v2": (
        "<s>Be terse.\n\n<｜User｜>Name a color.<｜Assistant｜>Blue.</s>",
        "<s>Be terse.\n\n<｜User｜>Name a color.<｜Assistant｜>",
    ),
    "jamba": (
        "<|startoftext|><|bom|><|system|> Be terse.<|eom|><|bom|><|user|> Name a color.<|eom|>"
        "<|bom|><|assistant|> Blue.<|eom|>",
        "<|startoftext|><|bom|><|system|> Be terse.<|eom|><|bom|><|user|> Name a color.<|eom|>"
        "<|bom|><|assistant|>",
    ),
    "gemma3n": (
        "<s><start_of_turn>user\nBe terse.\n\nName a color.<end_of_turn>\n"
        "<start_of_turn>model\nBlue.<end_of_turn>\n",
        "<s><start_of_turn>user\nBe terse.\n\nName a color.<end_of_turn>\n<start_of_turn>model\n",
    ),
    "gemma4": (
        "<s><|turn>system\nBe terse.<turn|>\n<|turn>user\nName a color.<turn|>\n"
        "<|turn>model\nBlue.<turn|>\n",
        "<s><|turn>system\nBe terse.<turn|>\n<|turn>user\nName a color.<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>",
    ),
    "pixtral": (
        "<s>[INST]Be terse.\n\nName a color.[/INST]Blue.</s>",
        "<s>[INST]Be terse.\n\nName a color.[/INST]",
    ),
}
RENDERS["gemma4_unified"] = RENDERS["gemma4"]

# name -> (the token that ends an assistant turn, the template's special tokens)
TOKENS = {
    "llama4": ("<|eot|>", ["<|header_start|>", "<|header_end|>", "<|eot|>"]),
    "qwen_25": ("<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen3": ("<|im_end|>", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
    "qwen3_5": ("<|im_end|>", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
    "falcon_h1": ("<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "cohere": (
        "<|END_OF_TURN_TOKEN|>",
        ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>"]
        + ["<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"],
    ),
    "deepseek_v2": ("</s>", ["<｜User｜>", "<｜Assistant｜>"]),
    "jamba": (
        "<|eom|>",
        ["<|startoftext|>", "<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>"],
    ),
    "gemma3n": ("<end_of_turn>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma4": ("<turn|>", ["<|turn>", "<turn|>", "<|channel>", "<channel|>"]),
    "gemma4_unified": ("<turn|>", ["<|turn>", "<turn|>", "<|channel>", "<channel|>"]),
    "pixtral": ("</s>", ["[INST]", "[/INST]"]),
}


def test_every_vendor_name_is_named_and_tested():
    assert set(VENDOR_TEMPLATES) == set(RENDERS) == set(TOKENS)
    assert set(VENDOR_TEMPLATES) <= set(NAMED_TEMPLATES)


@pytest.fixture(scope="module")
def vendor_tokenizer(tok_dir):
    """The tiny byte-level tokenizer with every vendor template's special tokens added."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_tokens(sorted({t for _, specials in TOKENS.values() for t in specials}), True)
    return tok


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_render_and_generation_prompt(vendor_tokenizer, name):
    template = NAMED_TEMPLATES[name]
    full, prompt = RENDERS[name]
    render = vendor_tokenizer.apply_chat_template
    assert render(CONVERSATION, chat_template=template, tokenize=False) == full
    assert (
        render(CONVERSATION[:2], chat_template=template, tokenize=False, add_generation_prompt=True)
        == prompt
    )


def rows_for(
    tok, name: str, row: dict, kind: str = "chat_template", **entry
) -> tuple[list[int], list[int]]:
    """input_ids and labels of a row through a chat format (`kind`) and the engine."""
    e = DatasetEntry(path="x.jsonl", type=kind, **entry)
    eot = TOKENS[name][0]
    engine = Engine(
        tok,
        chat_template=NAMED_TEMPLATES[name],
        eot_tokens=() if eot == tok.eos_token else (eot,),
    )
    (out,) = engine.tokenize(get_strategy(e, 0, False).sample(row))
    return out.input_ids, out.labels


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """ids and labels of consecutive (text, trained) pieces, checked to tokenize as a whole."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [M] * len(piece)
    whole = "".join(text for text, _ in pieces)
    assert ids == tok(whole, add_special_tokens=False)["input_ids"]
    return ids, labels


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_only_the_assistant_turn_is_trained(vendor_tokenizer, name):
    tok = vendor_tokenizer
    full = RENDERS[name][0]
    eot = TOKENS[name][0]
    before, after = full.split("Blue." + eot)
    # Jamba's `<|assistant|> ` space joins the answer's first token (` Blue`), which the
    # content overlaps: that token is trained
    lead = " " if name == "jamba" else ""
    ids, labels = rows_for(tok, name, {"messages": CONVERSATION})
    assert (ids, labels) == expected(
        tok,
        [(before.removesuffix(lead), False), (lead + "Blue.", True), (eot, True), (after, False)],
    )
    assert tok.decode([t for t in labels if t != M]) == lead + "Blue." + eot


def test_qwen_templates_print_contents_only():
    """The engine's one-render path applies to the text-only Qwen, Falcon, DeepSeek and
    Jamba templates; the others (trim, image parts) use its checked two-render path."""
    fast = {k for k, t in VENDOR_TEMPLATES.items() if content_only_printed(t)}
    assert fast == {"qwen_25", "qwen3", "falcon_h1", "deepseek_v2", "jamba"}


@pytest.mark.parametrize("kind", ["chat_template", "messages"])
@pytest.mark.parametrize("name", ["qwen3", "qwen3_5"])
def test_qwen3_reasoning_trace_is_trained_with_the_final_answer(vendor_tokenizer, name, kind):
    """Under TRL's `messages` type too (the trace was rendered there but left untrained)."""
    tok = vendor_tokenizer
    row = {
        "messages": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue.", "reasoning_content": "old thought"},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Red.", "reasoning_content": "Any color works."},
        ]
    }
    ids, labels = rows_for(tok, name, row, kind)
    # the earlier turn drops its trace (as the vendor renders history); the last turn's
    # trace is trained with its answer, from the trace on
    assert (ids, labels) == expected(
        tok,
        [
            ("<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n", False),
            ("Blue.", True),
            ("<|im_end|>", True),
            ("\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n<think>\n", False),
            ("Any color works.\n</think>\n\nRed.", True),
            ("<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_qwen3_thinking_off_generation_prompt(vendor_tokenizer):
    text = vendor_tokenizer.apply_chat_template(
        CONVERSATION[1:2],
        chat_template=NAMED_TEMPLATES["qwen3"],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == (
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_qwen_25_default_system_and_tools(vendor_tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = vendor_tokenizer.apply_chat_template(
        CONVERSATION[1:2], chat_template=NAMED_TEMPLATES["qwen_25"], tokenize=False, tools=tools
    )
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.\n\n# Tools\n\nYou may call one or more functions"
    )
    assert '<tools>\n{"type": "function", "function": {"name": "f", "parameters": {}}}\n' in text
    assert text.endswith("</tool_call><|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n")


def test_pixtral_keeps_the_system_text_in_the_last_user_turn(vendor_tokenizer):
    turns = [
        CONVERSATION[0],
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        *CONVERSATION[1:],
    ]
    text = vendor_tokenizer.apply_chat_template(
        turns, chat_template=NAMED_TEMPLATES["pixtral"], tokenize=False
    )
    assert text == "<s>[INST]Hi[/INST]Hello</s>[INST]Be terse.\n\nName a color.[/INST]Blue.</s>"


@pytest.mark.parametrize(
    ("where", "key"),
    [("top", "chat_template"), ("entry", "chat_template")],
)
def test_validate_refuses_a_template_newtune_cannot_render(tmp_path, model_dir, where, key):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = yaml.safe_load(make_config(tmp_path, model_dir, data, "chat_template").read_text())
    if where == "top":
        cfg[key] = "qwen9"
    else:
        cfg["datasets"][0][key] = "qwen9"
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    proc = cli("-m", "newtune.cli.main", "validate", str(tmp_path / "cfg.yml"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr[proc.stderr.index("newtune: error:") :].split())
    assert "`chat_template: qwen9` is not a chat template newtune can render" in err
    assert "chatml, llama3, qwen, mistral" in err and "qwen3, qwen3_5, falcon_h1" in err
    assert "`chat_template: tokenizer_default`" in err and "chat_template_jinja" in err
    assert proc.stdout == ""


def test_validate_accepts_vendor_names_jinja_and_entry_jinja(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = yaml.safe_load(make_config(tmp_path, model_dir, data, "chat_template").read_text())
    cfg["chat_template"] = "qwen3_5"
    cfg["datasets"][0]["chat_template"] = "jinja"  # Axolotl's spelling beside the jinja key
    cfg["datasets"][0]["chat_template_jinja"] = "{{ messages[0]['content'] }}"
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    proc = cli("-m", "newtune.cli.main", "validate", str(tmp_path / "cfg.yml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chat_template: qwen3_5" in proc.stdout
