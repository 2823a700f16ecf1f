"""Inference builds the prompt training built, for every kind of format, from the same config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl
from test_cli import make_config

from newtune.config.load import load_config
from newtune.inference import GenerationOptions, build_generator
from newtune.train.run import prepare_data


def setup(tmp_path: Path, model_dir: Path, rows: list[dict], entry: dict, **extra):
    """(generator, prepared training rows) for one dataset entry on the tiny model."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    path = make_config(tmp_path, model_dir, data, entry["type"], sequence_len=128, **extra)
    loaded = load_config(path)
    _, prepared = prepare_data(loaded)
    gen = build_generator(loaded.config, GenerationOptions(max_new_tokens=2))
    return gen, prepared.data["train"]


def first_trained(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


@pytest.mark.parametrize(
    ("entry", "row", "text"),
    [
        (
            {"type": "alpaca"},
            {"instruction": "Name a color.", "input": "", "output": "Blue."},
            "Name a color.",
        ),
        (
            {"type": "alpaca_chat.load_qa"},
            {"question": "Name a color.", "answer": "Blue."},
            "Name a color.",
        ),
        (
            {
                "type": {
                    "system_prompt": "Be terse.",
                    "system_format": "<<SYS>>{system}<</SYS>>",
                    "field_instruction": "q",
                    "field_output": "a",
                    "format": "[INST] {instruction} {input} [/INST]",
                    "no_input_format": "[INST] {instruction} [/INST]",
                }
            },
            {"q": "Name a color.", "a": "Blue."},
            "Name a color.",
        ),
    ],
    ids=["alpaca", "alpaca_chat.load_qa", "user-defined"],
)
def test_instruction_prompt_ids_equal_the_training_prompt(tmp_path, model_dir, entry, row, text):
    gen, train = setup(tmp_path, model_dir, [row], entry)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    assert gen.prompt_ids(text) == ids[: first_trained(labels)]


def test_completion_prompt_ids_equal_the_training_tokens(tmp_path, model_dir):
    text = "The capital of France is Paris."
    gen, train = setup(tmp_path, model_dir, [{"text": text}], {"type": "completion"})
    ids = train[0]["input_ids"]
    assert ids[-1] == gen.tokenizer.eos_token_id
    assert gen.prompt_ids(text) == ids[:-1]  # BOS + text, no EOS: the model continues it


def test_chat_prompt_with_a_running_conversation_equals_the_training_prefix(tmp_path, model_dir):
    turns = [("Name a color.", "Blue."), ("Another one?", "Red.")]
    messages = [
        m
        for q, a in turns
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    gen, train = setup(
        tmp_path,
        model_dir,
        [{"messages": messages}],
        {"type": "chat_template"},
        default_system_message="Be terse.",
    )
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    starts = [i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100]
    assert len(starts) == 2  # one trained span per assistant turn
    assert gen.prompt_ids("Name a color.") == ids[: starts[0]]
    assert gen.prompt_ids("Another one?", messages[:2]) == ids[: starts[1]]
    assert gen.tokenizer.decode(ids[: starts[0]]).startswith("<|im_start|>system\nBe terse.")


def test_quantized_inference_loads_the_base_in_8bit(tmp_path, model_dir):
    pytest.importorskip("bitsandbytes")
    gen, _ = setup(
        tmp_path,
        model_dir,
        [{"text": "Paris"}],
        {"type": "completion"},
        adapter="lora",
        load_in_8bit=True,
        lora_target_linear=True,
    )
    layer = gen.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt"
    assert isinstance(gen.answer("The capital"), str)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gradio_chat_page_answers_over_http(tmp_path, model_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("gradio")
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base_model": str(model_dir),
                "datasets": [{"path": str(data), "type": "chat_template"}],
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "newtune.cli.inference", str(cfg), "--gradio"]
        + ["--server_port", str(port), "--max_new_tokens", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                page = httpx.get(base + "/", timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.time() > deadline:
                    output = proc.stdout.read() if proc.stdout else "no output"
                    raise AssertionError(output) from None
                time.sleep(1)
        assert page.status_code == 200 and "newtune" in page.text
        # the chat function through gradio's HTTP API: POST the call, then read its events
        call = httpx.post(
            base + "/gradio_api/call/chat",
            json={"data": ["Name a color.", [], 4]},
            timeout=30,
        )
        assert call.status_code == 200, call.text
        event_id = call.json()["event_id"]
        events = httpx.get(f"{base}/gradio_api/call/chat/{event_id}", timeout=120).text
        assert "event: complete" in events, events
        payload = json.loads(events.split("event: complete\ndata: ", 1)[1].splitlines()[0])
        # the page answers exactly what the CLI answers (greedy, same prompt, same budget)
        gen = build_generator(load_config(cfg).config, GenerationOptions(max_new_tokens=4))
        assert payload[0] == gen.answer("Name a color.")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
