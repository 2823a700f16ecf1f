"""Vision-language fine-tuning through the CLI on a tiny random LLaVA saved with its processor.

A tiny VLM learns the colour of solid-colour pictures (LoRA on its language model), then
`newtune inference --image` names the colour of held-out pictures, `newtune evaluate` scores the
image rows, and `newtune merge-lora` writes a folder plain transformers loads. User errors
(missing image, non-image file, packing, DPO on images) are one paragraph, no traceback.

The commands run in this process through the CLI's `main` (`newtune`), which prints errors
and exits exactly as the console script does; `validate` also runs as a real subprocess. One
process keeps the file fast: torch and transformers are imported once, not per command.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_vision_data import _llava

Image = pytest.importorskip("PIL.Image")

COLOURS = {
    "red": (230, 20, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 230),
    "yellow": (240, 230, 10),
}
QUESTION = "What colour is this picture?"


@dataclass
class Result:
    """What one `newtune` command did: exit code and its captured output."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def newtune(capsys: pytest.CaptureFixture) -> Iterator[Callable[..., Result]]:
    """Run `newtune ARGS` in this process through the CLI's main, capturing its output."""
    import logging

    from newtune.cli.main import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    yield run
    root.handlers[:] = handlers  # the CLI's log handler writes to this test's captured stderr
    root.setLevel(level)


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run `newtune ARGS` in a subprocess (offline, one thread)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _picture(path: Path, rgb: tuple[int, int, int], rng: random.Random) -> str:
    shade = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in rgb)
    size = (rng.randint(18, 40), rng.randint(18, 40))
    Image.new("RGB", size, shade).save(path)
    return path.name


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory, chat_tok_dir: Path) -> Path:
    """A tiny random LLaVA (CLIP tower, 2-layer Llama) and its processor in one folder."""
    import torch

    folder = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(0)
    processor, build = _llava(chat_tok_dir)
    build().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl (image parts with relative paths) and held-out pictures in heldout/."""
    root = tmp_path_factory.mktemp("colours")
    (root / "img").mkdir()
    (root / "heldout").mkdir()
    rng = random.Random(0)
    rows = []
    for i in range(48):
        name = list(COLOURS)[i % len(COLOURS)]
        file = _picture(root / "img" / f"{i}.png", COLOURS[name], rng)
        user = [{"type": "image", "path": f"img/{file}"}, {"type": "text", "text": QUESTION}]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": name}]},
                ]
            }
        )
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, rgb in COLOURS.items():
        _picture(root / "heldout" / f"{name}0.png", rgb, rng)
    return root


def _config(tmp: Path, vlm: Path, data: Path, **extra: Any) -> Path:
    cfg = {
        "base_model": str(vlm),
        "processor_type": "AutoProcessor",
        "skip_prepare_dataset": True,
        "remove_unused_columns": False,
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
        "sequence_len": 128,
        "micro_batch_size": 4,
        "max_steps": 60,
        "learning_rate": 0.01,
        "lr_scheduler": "constant",
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "logging_steps": 10,
        "seed": 0,
        **extra,
    }
    path = tmp / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _clean_error(result: Result | subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI failed with one paragraph naming `needles`, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_tiny_vlm_learns_colours(
    tmp_path: Path, vlm_dir: Path, colour_data: Path, newtune: Callable[..., Result]
) -> None:
    cfg = _config(tmp_path, vlm_dir, colour_data / "train.jsonl", val_set_size=8)
    trained = newtune("train", str(cfg))
    assert trained.returncode == 0, trained.stderr[-4000:]
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    # lora_target_linear adapts the language model only; the vision tower and projector stay
    target = adapter["target_modules"]
    assert isinstance(target, str) and target.startswith("model\\.language_model\\.")
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".language_model." in n for n in names)
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    history = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses
    assert any("eval_loss" in h for h in history)

    answers = {}
    for picture in sorted((colour_data / "heldout").iterdir()):
        result = newtune(
            "inference",
            str(cfg),
            "--image",
            str(picture),
            "--prompt",
            QUESTION,
            "--max_new_tokens",
            "3",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        answers[picture.stem[:-1] + picture.stem[-1]] = result.stdout.strip().splitlines()[-1]
    right = sum(a.startswith(k[:-1]) for k, a in answers.items())
    assert right >= 3, answers  # of 4 held-out pictures, one per colour

    evaluated = newtune("evaluate", str(cfg))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout)
    assert metrics["eval_rows"] == 8 and metrics["eval_tokens"] > 0
    assert metrics["eval_loss"] < 6.0

    merged = newtune("merge-lora", str(cfg))
    assert merged.returncode == 0, merged.stderr[-3000:]
    _merged_loads(out / "merged", colour_data / "heldout" / "red0.png")


def _merged_loads(folder: Path, picture: Path) -> None:
    """The merged folder loads in plain transformers and answers like the adapter did."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert not any("lora" in n for n, _ in model.named_parameters())
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.open(picture)]], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answer.strip().startswith("red"), answer


def _one_row(folder: Path, image: str) -> Path:
    user = [{"type": "image", "path": image}, {"type": "text", "text": QUESTION}]
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "red"}]}
    path = folder / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def test_missing_image_is_a_clear_error(
    tmp_path: Path, vlm_dir: Path, newtune: Callable[..., Result]
) -> None:
    data = _one_row(tmp_path, "img/nowhere.png")
    cfg = _config(tmp_path, vlm_dir, data, skip_prepare_dataset=False)
    err = _clean_error(
        newtune("preprocess", str(cfg)), "data.jsonl) row 1", "img/nowhere.png", "does not exist"
    )
    assert str(tmp_path / "img" / "nowhere.png") in err
    assert not (tmp_path / "out").exists()


def test_non_image_file_is_a_clear_error(
    tmp_path: Path, vlm_dir: Path, newtune: Callable[..., Result]
) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    data = _one_row(tmp_path, "notes.png")
    # skip_prepare_dataset: the image is first opened when its batch is built, in training
    cfg = _config(tmp_path, vlm_dir, data, max_steps=1)
    err = _clean_error(newtune("train", str(cfg)), "data.jsonl) row 1", "notes.png")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert "error: datasets[0] (data.jsonl) row 1: notes.png is not an image Pillow can read" in err


def test_packing_is_refused(tmp_path: Path, vlm_dir: Path, newtune: Callable[..., Result]) -> None:
    data = _one_row(tmp_path, "x.png")
    cfg = _config(tmp_path, vlm_dir, data, sample_packing=True)
    _clean_error(newtune("train", str(cfg)), "sample_packing: true", "image rows cannot be packed")
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_dpo_on_images_is_out_of_scope(tmp_path: Path, vlm_dir: Path) -> None:
    data = _one_row(tmp_path, "x.png")
    cfg = _config(tmp_path, vlm_dir, data, rl="dpo")
    _clean_error(cli("validate", str(cfg)), "rl: dpo", "out of scope")


def test_preprocess_caches_rows_and_checks_images(
    tmp_path: Path, vlm_dir: Path, colour_data: Path, newtune: Callable[..., Result]
) -> None:
    cfg = _config(tmp_path, vlm_dir, colour_data / "train.jsonl", skip_prepare_dataset=False)
    result = newtune("preprocess", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "48 (checked)" in result.stderr
    import datasets

    ds = datasets.load_from_disk(result.stdout.strip().splitlines()[-1])["train"]
    assert ds.column_names == ["messages", "train", "origin", "base_dir", "mask"]
    first = json.loads(ds[0]["messages"])
    assert first[0]["content"][0] == {"type": "image", "path": "img/0.png"}
    assert ds[0]["base_dir"] == str(colour_data) and ds[0]["origin"].endswith("row 1")


def test_trl_images_column(tmp_path: Path, vlm_dir: Path, newtune: Callable[..., Result]) -> None:
    """TRL's vision format: `{type: image}` placeholders filled from an `images` column."""
    from newtune.config.load import load_config
    from newtune.data.prepare_vision import decode_row
    from newtune.models.processor import load_processor
    from newtune.train.methods.vision import CachedRowsCollator, vision_collator

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(buf, format="PNG")
    (tmp_path / "red.png").write_bytes(buf.getvalue())
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        "images": ["red.png"],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    cfg = _config(tmp_path, vlm_dir, tmp_path / "d.jsonl")
    result = newtune("preprocess", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    import datasets

    ds = datasets.load_from_disk(result.stdout.strip().splitlines()[-1])["train"]
    decoded = decode_row(ds[0])
    assert decoded["messages"][0]["content"][0] == {"type": "image", "image": "red.png"}
    config = load_config(str(cfg)).config
    batch = CachedRowsCollator(vision_collator(config, load_processor(config).processor))([ds[0]])
    assert batch["pixel_values"].shape == (1, 3, 24, 24)
    tok = load_processor(config).processor.tokenizer
    trained = [t for t in batch["labels"][0].tolist() if t != -100]
    assert tok.decode(trained) == "red<|im_end|>"


def test_qwen2_vl_processor_without_torchvision(tmp_path: Path, chat_tok_dir: Path) -> None:
    """A Qwen2-VL folder loads as an images-only Qwen2VLProcessor that saves under its name."""
    from test_vision_data import _qwen2_vl

    from newtune.config.schema import NewtuneConfig
    from newtune.models.processor import load_processor

    proc, _ = _qwen2_vl(chat_tok_dir)
    proc.tokenizer.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(proc.chat_template)
    (tmp_path / "processor_config.json").write_text('{"processor_class": "Qwen2VLProcessor"}')
    cfg = NewtuneConfig(
        base_model=str(tmp_path),
        processor_type="AutoProcessor",
        datasets=[{"path": "x.jsonl", "type": "chat_template"}],
    )
    loaded = load_processor(cfg).processor
    assert type(loaded).__name__ == "Qwen2VLProcessor"
    parts = [{"type": "image"}, {"type": "text", "text": "hi"}]
    text = loaded.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    out = loaded(text=[text], images=[[Image.new("RGB", (30, 30))]], return_tensors="pt")
    assert tuple(out["image_grid_thw"][0].tolist()) == (1, 4, 4)
    assert out["input_ids"][0].tolist().count(loaded.image_token_id) == 4
    loaded.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"
