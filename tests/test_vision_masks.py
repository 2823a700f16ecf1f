"""Masks of image rows: `role_boundaries` (token markers) and each dataset entry's own keys.

`role_boundaries` spans must equal the render-based masks on a ChatML template where both
apply, and a row whose markers are missing is an error naming the row. Rows of several image
datasets are masked by their own entry's `roles_to_train`/`train_on_eos` after preprocess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_vision_data import _llava, _png, _rows

from newtune.data.tokenize import IGNORE_INDEX
from newtune.data.vision import MASK_KEY, ORIGIN_KEY, VisionCollator
from newtune.errors import ConfigError, DataError

CHATML = [
    {"role": "assistant", "start": "<|im_start|>assistant\n", "end": "<|im_end|>"},
    {"role": "user", "start": "<|im_start|>user\n", "end": "<|im_end|>"},
    {"role": "system", "start": "<|im_start|>system\n", "end": "<|im_end|>"},
]


@pytest.fixture(scope="module")
def proc(chat_tok_dir: Path) -> Any:
    """The tiny LLaVA processor (ChatML template with image parts)."""
    return _llava(chat_tok_dir)[0]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """img/red.png and img/blue.png."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(_png((255, 0, 0), (50, 40)))
    (tmp_path / "img" / "blue.png").write_bytes(_png((0, 0, 255), (30, 30)))
    return tmp_path


def _trained(tok: Any, labels: list[int]) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs: list[list[int]] = [[]]
    for t in labels:
        if t == IGNORE_INDEX:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(t)
    return [tok.decode(r) for r in runs if r]


@pytest.mark.parametrize("eos", ["turn", "all", "last", "none"])
@pytest.mark.parametrize("roles", [("assistant",), ("assistant", "user")])
def test_boundaries_equal_render_masks(proc: Any, image_dir: Path, eos: str, roles: tuple) -> None:
    rows = _rows(["img/red.png", "img/blue.png"])
    render = VisionCollator(proc, base_dir=image_dir, roles_to_train=roles, train_on_eos=eos)
    marked = VisionCollator(
        proc, base_dir=image_dir, roles_to_train=roles, train_on_eos=eos, role_boundaries=CHATML
    )
    want, got = render(rows), marked(rows)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["labels"].tolist() == want["labels"].tolist()
    assert (got["labels"] != IGNORE_INDEX).any()


def test_boundaries_expected_spans(proc: Any, image_dir: Path) -> None:
    """The exact spans: assistant text + end marker; include_start; end marker shared."""
    row = _rows(["img/red.png", "img/blue.png"])[0]
    tok = proc.tokenizer
    batch = VisionCollator(proc, base_dir=image_dir, role_boundaries=CHATML)([row])
    assert _trained(tok, batch["labels"][0].tolist()) == [
        "Red<|im_end|>",
        "Blue, red, green.<|im_end|>",
    ]
    opened = [{**CHATML[0], "include_start": True, "include_end": False}]
    batch = VisionCollator(proc, base_dir=image_dir, role_boundaries=opened)([row])
    assert _trained(tok, batch["labels"][0].tolist()) == [
        "<|im_start|>assistant\nRed",
        "<|im_start|>assistant\nBlue, red, green.",
    ]
    # no end: the turn runs to the end of the sequence (the rest of the render)
    to_end = [{"role": "assistant", "start": "<|im_start|>assistant\n"}]
    batch = VisionCollator(proc, base_dir=image_dir, role_boundaries=to_end)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    head = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    body = next(j for j in range(len(ids)) if ids[j : j + len(head)] == head) + len(head)
    assert labels == [IGNORE_INDEX] * body + ids[body:]
    assert tok.decode(ids[body:]).startswith("Red<|im_end|>")
    # train_on_inputs trains every declared role's turn; image tokens never
    batch = VisionCollator(
        proc, base_dir=image_dir, role_boundaries=CHATML[:2], train_on_inputs=True
    )([row])
    runs = _trained(tok, batch["labels"][0].tolist())
    assert runs == [
        "What colour?<|im_end|>",
        "Red<|im_end|>",
        "Name a color.<|im_end|>",
        "Blue, red, green.<|im_end|>",
    ]
    assert "<image>" not in "".join(runs)


def test_boundary_not_found_names_the_row(proc: Any, image_dir: Path) -> None:
    row = {**_rows(["img/red.png", "img/blue.png"])[0], ORIGIN_KEY: "data.jsonl row 4"}
    wrong = [{"role": "assistant", "start": "<|im_start|>model\n", "end": "<|im_end|>"}]
    with pytest.raises(DataError) as err:
        VisionCollator(proc, base_dir=image_dir, role_boundaries=wrong)([row])
    assert str(err.value).startswith("data.jsonl row 4 has `assistant` messages but the")
    assert "'<|im_start|>model\\n'" in str(err.value)
    no_end = [{"role": "assistant", "start": "<|im_start|>assistant\n", "end": "</turn>"}]
    with pytest.raises(DataError, match=r"^data.jsonl row 4: the `assistant` turn opened by"):
        VisionCollator(proc, base_dir=image_dir, role_boundaries=no_end)([row])
    user_only = [CHATML[1]]
    with pytest.raises(DataError, match=r"^data.jsonl row 4 has assistant turns to train but"):
        VisionCollator(proc, base_dir=image_dir, role_boundaries=user_only)([row])
    flagged = {**row, "train": [None, False, None, None]}
    with pytest.raises(DataError, match=r"^data.jsonl row 4 has per-message train flags"):
        VisionCollator(proc, base_dir=image_dir, role_boundaries=CHATML)([flagged])
    with pytest.raises(ConfigError, match=r"role_boundaries\[0\] \(role 'assistant'\): start"):
        VisionCollator(proc, role_boundaries=[{"role": "assistant", "start": ""}])


def test_row_masks_override_the_default(proc: Any, image_dir: Path) -> None:
    rows = _rows(["img/red.png", "img/blue.png"])
    own = {"roles_to_train": ["user"], "train_on_eos": "none"}
    batch = VisionCollator(proc, base_dir=image_dir)([{**rows[0], MASK_KEY: own}, rows[1]])
    tok = proc.tokenizer
    assert _trained(tok, batch["labels"][0].tolist()) == ["What colour?", "Name a color."]
    assert _trained(tok, batch["labels"][1].tolist()) == ["Blue<|im_end|>"]


def test_each_dataset_masks_its_own_rows(
    tmp_path: Path, chat_tok_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two image datasets with different roles_to_train/train_on_eos, through preprocess."""
    from newtune.cli.main import main
    from newtune.config.load import load_config
    from newtune.data.prepare_vision import decode_row
    from newtune.models.processor import load_processor
    from newtune.train.methods.vision import CachedRowsCollator, vision_collator

    proc, _ = _llava(chat_tok_dir)
    proc.save_pretrained(tmp_path / "proc")
    (tmp_path / "red.png").write_bytes(_png((255, 0, 0), (20, 20)))
    user = [{"type": "image", "path": "red.png"}, {"type": "text", "text": "Colour?"}]
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "red"}]}
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    cfg = {
        "base_model": str(tmp_path / "proc"),
        "processor_type": "AutoProcessor",
        "datasets": [
            {"path": str(tmp_path / "a.jsonl"), "type": "chat_template"},
            {
                "path": str(tmp_path / "b.jsonl"),
                "type": "chat_template",
                "roles_to_train": ["user"],
                "train_on_eos": "none",
            },
        ],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 128,
    }
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    main(["preprocess", str(tmp_path / "cfg.yml")])
    import datasets

    ds = datasets.load_from_disk(capsys.readouterr().out.strip().splitlines()[-1])["train"]
    assert ds.column_names == ["messages", "train", "origin", "base_dir", "mask"]
    assert [decode_row(r)[MASK_KEY] for r in ds] == [
        {"roles_to_train": ["assistant"], "train_on_eos": "turn"},
        {"roles_to_train": ["user"], "train_on_eos": "none"},
    ]
    config = load_config(str(tmp_path / "cfg.yml")).config
    processor = load_processor(config).processor
    batch = CachedRowsCollator(vision_collator(config, processor))([ds[0], ds[1]])
    tok = processor.tokenizer
    assert _trained(tok, batch["labels"][0].tolist()) == ["red<|im_end|>"]
    assert _trained(tok, batch["labels"][1].tolist()) == ["Colour?"]
