"""Exact input_ids and labels for each format, laid out as Axolotl lays them out."""

from __future__ import annotations

import pytest

from newtune.config.schema import DatasetEntry
from newtune.data.strategies import get_strategy
from newtune.data.tokenize import IGNORE_INDEX, Engine
from newtune.errors import ConfigError, DataError

M = IGNORE_INDEX

NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
)
INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\nThe fox\n\n### Response:\n"
)


def rows_for(tok, entry: dict, row: dict, train_on_inputs: bool = False, **engine_kw):
    e = DatasetEntry(path="x.jsonl", **entry)
    strategy = get_strategy(e, 0, train_on_inputs)
    engine = Engine(
        tok,
        chat_template=tok.chat_template,
        roles_to_train=tuple(e.roles_to_train or ("assistant",)),
        train_on_eos=e.train_on_eos or "turn",
        train_on_inputs=train_on_inputs,
        **engine_kw,
    )
    return engine.tokenize(strategy.sample(row))


def enc(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_alpaca_without_input(tokenizer, train_on_inputs):
    (row,) = rows_for(
        tokenizer,
        {"type": "alpaca"},
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        train_on_inputs,
    )
    prompt = enc(tokenizer, NO_INPUT_PROMPT, special=True)
    response = enc(tokenizer, "Blue.")
    eos = tokenizer.eos_token_id
    assert prompt[0] == tokenizer.bos_token_id == 1 and prompt[1] != 1
    assert row.input_ids == prompt + response + [eos]
    assert row.labels == (prompt if train_on_inputs else [M] * len(prompt)) + response + [eos]
    assert tokenizer.decode(row.input_ids) == "<s>" + NO_INPUT_PROMPT + "Blue.</s>"


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_alpaca_with_input(tokenizer, train_on_inputs):
    (row,) = rows_for(
        tokenizer,
        {"type": "alpaca"},
        {"instruction": "Translate to French.", "input": "The fox", "output": "Le renard."},
        train_on_inputs,
    )
    prompt = enc(tokenizer, INPUT_PROMPT, special=True)
    response = enc(tokenizer, "Le renard.")
    eos = tokenizer.eos_token_id
    assert row.input_ids == prompt + response + [eos]
    assert row.labels == (prompt if train_on_inputs else [M] * len(prompt)) + response + [eos]
    assert tokenizer.decode(row.input_ids) == "<s>" + INPUT_PROMPT + "Le renard.</s>"
    trained = [t for t in row.labels if t != M]
    expected = "<s>" + INPUT_PROMPT + "Le renard.</s>" if train_on_inputs else "Le renard.</s>"
    assert tokenizer.decode(trained) == expected


def test_alpaca_missing_input_column_uses_no_input_prompt(tokenizer):
    (row,) = rows_for(
        tokenizer, {"type": "alpaca"}, {"instruction": "Name a color.", "output": "Blue."}
    )
    assert tokenizer.decode(row.input_ids) == "<s>" + NO_INPUT_PROMPT + "Blue.</s>"


def test_completion_trains_every_token(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    (row,) = rows_for(tokenizer, {"type": "completion"}, {"text": text})
    expected = enc(tokenizer, text, special=True) + [tokenizer.eos_token_id]
    assert row.input_ids == expected
    assert row.labels == expected


def test_completion_custom_field_and_chunking(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    rows = rows_for(
        tokenizer, {"type": "completion", "field": "body"}, {"body": text}, sequence_len=16
    )
    full = enc(tokenizer, text, special=True) + [tokenizer.eos_token_id]
    assert [r.input_ids for r in rows] == [full[i : i + 16] for i in range(0, len(full), 16)]
    assert all(r.labels == r.input_ids for r in rows)
    assert len(rows) == -(-len(full) // 16) >= 2


CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def chat_pieces(trained_eot: tuple[bool, bool] = (True, True), train_content: bool = True):
    """The ChatML rendering of CONVERSATION cut where training starts and stops."""
    a, b = trained_eot
    return [
        (
            "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
            "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello!", train_content),
        ("<|im_end|>", a),
        (
            "\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Paris.", train_content),
        ("<|im_end|>", b),
        ("\n", False),
    ]


def expected_from(tok, pieces):
    ids, labels = [], []
    for text, trained in pieces:
        piece = enc(tok, text)
        ids += piece
        labels += piece if trained else [M] * len(piece)
    return ids, labels


def test_chat_template_multi_turn_with_system(chat_tokenizer):
    (row,) = rows_for(chat_tokenizer, {"type": "chat_template"}, {"messages": CONVERSATION})
    ids, labels = expected_from(chat_tokenizer, chat_pieces())
    rendered = "".join(text for text, _ in chat_pieces())
    assert ids == enc(chat_tokenizer, rendered)  # pieces align with the whole-text tokens
    assert row.input_ids == ids
    assert row.labels == labels
    trained = chat_tokenizer.decode([t for t in row.labels if t != M])
    assert trained == "Hello!<|im_end|>Paris.<|im_end|>"


@pytest.mark.parametrize(
    ("train_on_eos", "eot"),
    [("turn", (True, True)), ("last", (False, True)), ("none", (False, False))],
)
def test_chat_template_train_on_eos(chat_tokenizer, train_on_eos, eot):
    (row,) = rows_for(
        chat_tokenizer,
        {"type": "chat_template", "train_on_eos": train_on_eos},
        {"messages": CONVERSATION},
    )
    assert (row.input_ids, row.labels) == expected_from(chat_tokenizer, chat_pieces(eot))


def test_chat_template_train_on_eos_all_trains_every_turn_end(chat_tokenizer):
    (row,) = rows_for(
        chat_tokenizer,
        {"type": "chat_template", "train_on_eos": "all"},
        {"messages": CONVERSATION},
    )
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ends = [i for i, t in enumerate(row.labels) if t == im_end]
    all_ends = [i for i, t in enumerate(row.input_ids) if t == im_end]
    assert trained_ends == all_ends and len(all_ends) == 5


def test_chat_template_roles_to_train_user(chat_tokenizer):
    (row,) = rows_for(
        chat_tokenizer,
        {"type": "chat_template", "roles_to_train": ["user"]},
        {"messages": CONVERSATION},
    )
    trained = chat_tokenizer.decode([t for t in row.labels if t != M])
    assert trained == "Hello there!<|im_end|>What is the capital of France?<|im_end|>"


def test_chat_template_sharegpt_style_mappings(chat_tokenizer):
    convo = [
        {"from": "human", "value": "Hello there!"},
        {"from": "gpt", "value": "Hello!"},
    ]
    (row,) = rows_for(
        chat_tokenizer,
        {
            "type": "chat_template",
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
        },
        {"conversations": convo},
    )
    ids, labels = expected_from(
        chat_tokenizer,
        [
            ("<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello!<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (row.input_ids, row.labels) == (ids, labels)


def test_chat_template_custom_roles(chat_tokenizer):
    convo = [{"role": "me", "content": "Hello there!"}, {"role": "bot", "content": "Hello!"}]
    (row,) = rows_for(
        chat_tokenizer,
        {"type": "chat_template", "roles": {"user": ["me"], "assistant": ["bot"]}},
        {"messages": convo},
    )
    assert chat_tokenizer.decode(row.input_ids).startswith("<|im_start|>user\nHello there!")
    assert chat_tokenizer.decode([t for t in row.labels if t != M]) == "Hello!<|im_end|>"


def test_inference_prompt_equals_training_prompt(tokenizer, chat_tokenizer):
    e = DatasetEntry(path="x.jsonl", type="alpaca")
    alpaca = get_strategy(e, 0, False)
    engine = Engine(tokenizer)
    (row,) = engine.tokenize(
        alpaca.sample({"instruction": "Name a color.", "input": "", "output": "Blue."})
    )
    prompt = engine.prompt_ids(alpaca.prompt("Name a color."))
    assert row.input_ids[: len(prompt)] == prompt
    assert row.labels[len(prompt) - 1] == M and row.labels[len(prompt)] != M

    chat = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    cengine = Engine(chat_tokenizer, chat_template=chat_tokenizer.chat_template)
    (crow,) = cengine.tokenize(chat.sample({"messages": CONVERSATION[1:3]}))
    cprompt = cengine.prompt_ids(chat.prompt("Hello there!"))
    assert crow.input_ids[: len(cprompt)] == cprompt
    assert all(t == M for t in crow.labels[: len(cprompt)])
    assert crow.labels[len(cprompt)] != M


def _count_renders(tokenizer, monkeypatch) -> list:
    calls: list = []
    real = type(tokenizer).apply_chat_template

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counting)
    return calls


def test_chat_spans_come_from_one_render_when_the_template_only_prints_content(
    chat_tokenizer, monkeypatch
):
    calls = _count_renders(chat_tokenizer, monkeypatch)
    long = [CONVERSATION[0]] + CONVERSATION[1:] * 10  # 21 messages
    (row,) = rows_for(chat_tokenizer, {"type": "chat_template"}, {"messages": long})
    assert len(calls) == 1
    trained = chat_tokenizer.decode([t for t in row.labels if t != M])
    assert trained == "Hello!<|im_end|>Paris.<|im_end|>" * 10


def test_chat_spans_are_checked_against_a_plain_render_for_other_templates(
    chat_tokenizer, monkeypatch
):
    from newtune.chat_templates import LLAMA3

    calls = _count_renders(chat_tokenizer, monkeypatch)
    long = [CONVERSATION[0]] + CONVERSATION[1:] * 10
    engine = Engine(chat_tokenizer, chat_template=LLAMA3)
    strategy = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    (row,) = engine.tokenize(strategy.sample({"messages": long}))
    assert len(calls) == 2  # marked + plain; `| trim` leaves these contents unchanged
    trained = chat_tokenizer.decode([t for t in row.labels if t != M])
    assert trained == "Hello!Paris." * 10  # this tokenizer has no <|eot_id|> token


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}",
            True,
        ),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", True),
        (
            "{% for m in messages %}{% if m.content %}{{ m.content ~ '!' }}{% endif %}{% endfor %}",
            True,
        ),
        (
            "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% endif %}{% endfor %}",
            True,
        ),
        ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}", False),
        (
            "{% for m in messages %}{% if m.content.startswith('<t>') %}x{% endif %}{% endfor %}",
            False,
        ),
        ("{% for m in messages %}{% set c = m.content %}{{ c }}{% endfor %}", False),
        ("{% for m in messages %}{% if m.content == 'hi' %}x{% endif %}{% endfor %}", False),
        (
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            False,
        ),
        ("{{ unclosed", False),
    ],
)
def test_content_only_printed(template, expected):
    from newtune.chat_templates import content_only_printed

    assert content_only_printed(template) is expected


def test_chat_template_that_trims_content_falls_back(chat_tokenizer):
    from newtune.chat_templates import LLAMA3

    convo = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": " Paris. "},
    ]
    engine = Engine(chat_tokenizer, chat_template=LLAMA3)
    strategy = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    (row,) = engine.tokenize(strategy.sample({"messages": convo}))
    assert chat_tokenizer.decode(row.input_ids).endswith(
        "assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    )
    assert chat_tokenizer.decode([t for t in row.labels if t != M]) == "Paris."


def test_tools_reach_the_template(chat_tokenizer):
    from newtune.data.strategies import Conversation

    template = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='name') | join(', ') }}"
        "<|im_end|>\n{% endif %}" + chat_tokenizer.chat_template
    )
    engine = Engine(chat_tokenizer, chat_template=template)
    conv = Conversation(tuple(CONVERSATION[1:3]))
    object.__setattr__(conv, "tools", [{"name": "search"}, {"name": "calc"}])
    (row,) = engine.tokenize(conv)
    assert chat_tokenizer.decode(row.input_ids).startswith(
        "<|im_start|>system\nTools: search, calc<|im_end|>\n"
    )
    assert chat_tokenizer.decode([t for t in row.labels if t != M]) == "Hello!<|im_end|>"


def test_per_message_training_field_and_drop_system(chat_tokenizer):
    convo = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hello!", "train": False},
        {"role": "user", "content": "What is the capital of France?", "train": True},
        {"role": "assistant", "content": "Paris."},
    ]
    entry = {
        "type": "chat_template",
        "message_field_training": "train",
        "drop_system_message": True,
    }
    (row,) = rows_for(chat_tokenizer, entry, {"messages": convo})
    text = chat_tokenizer.decode(row.input_ids)
    assert text.startswith("<|im_start|>user\nHello there!")  # the system turn is gone
    trained = chat_tokenizer.decode([t for t in row.labels if t != M])
    assert trained == "What is the capital of France?<|im_end|>Paris.<|im_end|>"


def test_field_tools_column(chat_tokenizer):
    template = (
        "{% if tools %}Tools: {{ tools | map(attribute='name') | join(', ') }}\n{% endif %}"
        + chat_tokenizer.chat_template
    )
    convo = CONVERSATION[1:3]
    from newtune.config.schema import NewtuneConfig
    from newtune.data.prepare import engine_for

    cfg = NewtuneConfig(base_model="m", datasets=[{"path": "x.jsonl", "type": "chat_template"}])
    entry = DatasetEntry(
        path="x.jsonl", type="chat_template", field_tools="functions", chat_template=template
    )
    engine = engine_for(entry, cfg, chat_tokenizer, chat_tokenizer.chat_template)
    sample = get_strategy(entry, 0, False).sample(
        {"messages": convo, "functions": '[{"name": "search"}]'}
    )
    (row,) = engine.tokenize(sample)
    assert chat_tokenizer.decode(row.input_ids).startswith("Tools: search\n<|im_start|>user\n")
    assert chat_tokenizer.decode([t for t in row.labels if t != M]) == "Hello!<|im_end|>"


def test_eot_tokens_choose_the_end_of_turn(tokenizer):
    # tokenizer's EOS is </s>; with chatml the turn ends with <|im_end|>
    from newtune.chat_templates import CHATML

    strategy = get_strategy(DatasetEntry(path="x", type="chat_template"), 0, False)
    sample = strategy.sample({"messages": CONVERSATION[1:3]})
    plain = Engine(tokenizer, chat_template=CHATML).tokenize(sample)[0]
    assert tokenizer.decode([t for t in plain.labels if t != M]) == "Hello!"
    eot = Engine(tokenizer, chat_template=CHATML, eot_tokens=("<|im_end|>",)).tokenize(sample)[0]
    assert tokenizer.decode([t for t in eot.labels if t != M]) == "Hello!<|im_end|>"
    with pytest.raises(DataError, match=r"^eot_tokens: `<\|nope\|>` is not a single token"):
        Engine(tokenizer, eot_tokens=("<|nope|>",))


@pytest.mark.parametrize("name", ["chatml", "qwen", "mistral", "gemma", "phi_3", "llama3"])
def test_named_templates_train_only_assistant_content(chat_tokenizer, name):
    from newtune.chat_templates import resolve_chat_template

    engine = Engine(chat_tokenizer, chat_template=resolve_chat_template(name, None))
    strategy = get_strategy(DatasetEntry(path="x", type="chat_template"), 0, False)
    (row,) = engine.tokenize(strategy.sample({"messages": CONVERSATION}))
    trained = chat_tokenizer.decode([t for t in row.labels if t != M])
    assert trained.replace("<|im_end|>", "") == "Hello!Paris."
    assert "What is the capital of France?" in chat_tokenizer.decode(row.input_ids)


def test_jinja_file_template(tmp_path):
    from newtune.chat_templates import CHATML, resolve_chat_template

    path = tmp_path / "t.jinja"
    path.write_text(CHATML)
    assert resolve_chat_template(str(path), None) == CHATML
    with pytest.raises(ConfigError, match="chat template file .*missing.jinja does not exist"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), None)


def test_byte_level_spans_equal_offset_spans_on_non_ascii_text(chat_tokenizer):
    convo = [
        {"role": "system", "content": "Réponds en français 🙂."},
        {"role": "user", "content": "Où est la tour Eiffel ?"},
        {"role": "assistant", "content": "À Paris — près de la Seine ✓."},
        {"role": "user", "content": "Merci!"},
        {"role": "assistant", "content": "De rien 😀"},
    ]
    strategy = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    fast = Engine(chat_tokenizer)
    assert fast._byte_lengths is not None  # the test tokenizer is byte-level BPE
    slow = Engine(chat_tokenizer)
    slow.__dict__["_byte_lengths"] = None  # force the offsets path
    (a,) = fast.tokenize(strategy.sample({"messages": convo}))
    (b,) = slow.tokenize(strategy.sample({"messages": convo}))
    assert a == b
    trained = chat_tokenizer.decode([t for t in a.labels if t != M])
    assert trained == "À Paris — près de la Seine ✓.<|im_end|>De rien 😀<|im_end|>"


def test_byte_level_spans_fall_back_when_lengths_do_not_tile_the_text(chat_tokenizer):
    from newtune.data.tokenize import _byte_span_finder

    engine = Engine(chat_tokenizer)
    text = "hello world"
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _byte_span_finder(text, ids, engine._byte_lengths) is not None
    assert _byte_span_finder(text + " ", ids, engine._byte_lengths) is None


def test_a_template_that_skips_a_message_still_gets_the_right_spans(chat_tokenizer):
    skips_system = (
        "{% for m in messages %}{% if m['role'] != 'system' %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
    )
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    engine = Engine(chat_tokenizer, chat_template=skips_system)
    strategy = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    (row,) = engine.tokenize(strategy.sample({"messages": convo}))
    assert "Be brief" not in chat_tokenizer.decode(row.input_ids)
    assert chat_tokenizer.decode([t for t in row.labels if t != M]) == "Paris.<|im_end|>"


SHAPES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Anything else? ✓"},
    ],
    [{"role": "user", "content": "a\ue000b"}, {"role": "assistant", "content": "marker inside"}],
    [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}],
]


def test_skeleton_renders_equal_full_renders_and_are_reused(chat_tokenizer, monkeypatch):
    strategy = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    samples = [strategy.sample({"messages": m}) for m in SHAPES * 5]
    full = Engine(chat_tokenizer)
    full.__dict__["_single_render"] = False  # marked + plain renders for every conversation
    expected = full.tokenize_many(samples)
    fast = Engine(chat_tokenizer)
    assert fast._single_render
    assert fast.tokenize_many(samples) == expected  # the marker row takes the full path
    calls = _count_renders(chat_tokenizer, monkeypatch)
    fresh = Engine(chat_tokenizer)
    plain = [s for s in samples if "\ue000" not in s.messages[0]["content"]]
    assert fresh.tokenize_many(plain) == [
        e for s, e in zip(samples, expected, strict=True) if s in plain
    ]
    assert len(calls) == 2  # one render per shape: 2 turns (two rows share it), 5 turns
    assert len(fresh._skeletons) == 2


def test_a_template_printing_a_content_twice_falls_back_to_full_renders(chat_tokenizer):
    twice = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    engine = Engine(chat_tokenizer, chat_template=twice)
    strategy = get_strategy(DatasetEntry(path="x.jsonl", type="chat_template"), 0, False)
    (row,) = engine.tokenize(strategy.sample({"messages": SHAPES[0]}))
    assert chat_tokenizer.decode(row.input_ids).endswith(
        "Hi<|im_end|>\nHi<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert chat_tokenizer.decode([t for t in row.labels if t != M]) == "Hello!<|im_end|>"
