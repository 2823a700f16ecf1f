"""Trust in the config schema: per-format entry keys, text fields, val_set_size, layering."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from newtune.config.schema import DatasetEntry, NewtuneConfig, status_of
from newtune.config.schema.formats import FORMATS, PROMPT_STYLES, SOURCE_KEYS, readers_of
from newtune.data.strategies import get_strategy
from newtune.data.strategies.base import as_text
from newtune.errors import DataError

SRC = Path(__file__).parent.parent / "src" / "newtune"
CHAT_READERS = "(read by `type: chat_template`, `type: messages`, `type: sharegpt`)"


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


def write_config(folder: Path, **cfg) -> Path:
    path = folder / "cfg.yml"
    path.write_text(yaml.safe_dump({"base_model": "./model", **cfg}, sort_keys=False))
    return path


def validate(folder: Path, **cfg) -> subprocess.CompletedProcess:
    before = sorted(p.name for p in folder.iterdir())
    result = cli("validate", str(write_config(folder, **cfg)), cwd=folder)
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, "cfg.yml"])
    return result


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- 1. dataset-entry keys are checked per format -------------------------------------------------


def test_validate_refuses_keys_the_format_does_not_read(tmp_path):
    entry = {"path": "d.jsonl", "type": "alpaca", "field_messages": "x", "roles_to_train": ["a"]}
    result = validate(tmp_path, datasets=[entry], test_datasets=[{**entry, "type": "completion"}])
    assert result.returncode == 2
    err = one_line(result.stderr)
    for where, kind in (("datasets[0]", "alpaca"), ("test_datasets[0]", "completion")):
        for key in ("field_messages", "roles_to_train"):
            assert (
                f"`{where}.{key}` is set, but `type: {kind}` does not read it {CHAT_READERS}; "
                "remove it" in err
            )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "alpaca", "field": "text"}, "`datasets[0].field` is set, but `type: alpaca` "),
        ({"type": "completion", "conversation": "chat"}, "read by `type: alpaca_chat`, "),
        ({"type": "messages", "drop_system_message": True}, "`type: messages` does not read"),
        ({"type": "prompt_completion", "field_messages": "m"}, "`type: prompt_completion` does"),
        ({"type": "chat_template", "field_human": "me"}, "(read by `type: sharegpt`)"),
        ({"type": "alpaca:chatml", "chat_template": "chatml"}, "`type: alpaca:chatml` does not"),
        ({"type": {"format": "{instruction}"}, "system_prompt": "Hi"}, "beside a `type:` mapping"),
        ({"type": "alpaca_chat", "conversation": "vicuna"}, "`datasets[0].conversation: vicuna`"),
        ({"type": "sharegpt", "conversation": "vicuna"}, "is not one of chatml, llama3"),
    ],
)
def test_each_format_names_the_key_it_does_not_read(tmp_path, entry, message):
    result = validate(tmp_path, datasets=[{"path": "d.jsonl", **entry}])
    assert result.returncode == 2 and message in one_line(result.stderr)


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "completion", "field": "body", "split": "train", "shards": 2, "ds_type": "json"},
        {"type": "alpaca_chat", "conversation": "chatml", "revision": "main"},
        {"type": "chat_template", "field_messages": "m", "roles_to_train": ["assistant"]},
        {"type": "sharegpt", "field_human": "me", "conversation": "chatml"},
        {"type": "messages", "field_tools": "t", "train_on_eos": "all"},
        {"type": "user_defined", "field_instruction": "q", "format": "{instruction} {input}"},
        {"type": {"field_instruction": "q"}, "data_files": ["a.jsonl"], "name": "cfg"},
    ],
)
def test_keys_the_format_reads_validate(tmp_path, entry):
    result = validate(tmp_path, datasets=[{"path": "d.jsonl", **entry}])
    assert result.returncode == 0, result.stderr


def test_a_plugin_format_takes_any_key_and_validate_runs_no_plugin_code(tmp_path):
    package = tmp_path / "lib" / "nt_marker_pkg"
    package.mkdir(parents=True)
    marker = tmp_path / "lib" / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    entry = {"path": "d.jsonl", "type": "nt_marker_pkg.fmt.load", "field_messages": "x"}
    cfg = write_config(tmp_path, datasets=[entry])
    result = cli("validate", str(cfg), cwd=tmp_path, PYTHONPATH=str(tmp_path / "lib"))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_a_plugin_class_inheriting_a_builtin_format_reads_any_key(tmp_path, monkeypatch):
    (tmp_path / "nt_inherit_pkg.py").write_text(
        "from newtune.data.strategies.alpaca import Alpaca\n\nclass Mine(Alpaca):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = DatasetEntry(path="x", type="nt_inherit_pkg.Mine", field_messages="m")
    assert get_strategy(entry, 0, False).entry_keys == frozenset()
    sys.modules.pop("nt_inherit_pkg", None)


def test_every_builtin_format_declares_its_keys_and_every_key_has_a_reader():
    from newtune.data.strategies.instruct import STYLES
    from newtune.data.strategies.registry import _REGISTRY, known_types

    builtin = {n: c for n, c in _REGISTRY.items() if n in FORMATS}
    assert set(FORMATS) <= set(known_types()) and set(builtin) == set(FORMATS)
    for name, cls in builtin.items():
        assert (cls.entry_keys, cls.styles) == (FORMATS[name].reads, FORMATS[name].styles), name
    assert tuple(STYLES) == PROMPT_STYLES
    for key in DatasetEntry.model_fields:
        assert key in SOURCE_KEYS or readers_of(key), key
    assert readers_of("conversation") == ["alpaca_chat", "sharegpt"]


# -- 2. numbers and mappings where a format expects text ------------------------------------------


def preprocess(tmp_path: Path, tok_dir: Path, rows: list[dict], kind: str = "alpaca"):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = write_config(
        tmp_path,
        datasets=[{"path": str(data), "type": kind}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        sequence_len=512,
    )
    cfg.write_text(cfg.read_text().replace("./model", str(tok_dir)))
    result = cli("preprocess", str(cfg), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    return result


def test_numbers_in_text_columns_are_read_as_their_text(tmp_path, tok_dir):
    result = preprocess(tmp_path, tok_dir, [{"instruction": 12, "input": 3.5, "output": 7}] * 3)
    assert result.returncode == 0, result.stderr
    import datasets

    (prepared,) = [p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = datasets.load_from_disk(str(prepared))["train"][0]["input_ids"]
    text = tok.decode(ids)
    assert "### Instruction:\n12\n\n### Input:\n3.5\n\n### Response:\n7</s>" in text


def test_a_mapping_in_a_text_column_is_an_error_naming_row_and_column(tmp_path, tok_dir):
    result = preprocess(tmp_path, tok_dir, [{"instruction": {"a": "b"}, "output": "x"}] * 2)
    assert result.returncode == 2, result.stderr
    assert (
        f"datasets[0] ({tmp_path / 'd.jsonl'}) row 0: column `instruction` holds a mapping, not "
        "text; write it as a string" in one_line(result.stderr)
    )
    assert not [p for p in (tmp_path / "prepared").iterdir() if not p.name.endswith(".lock")]


def test_as_text_and_chat_contents():
    assert (as_text("a", "x"), as_text(5, "x"), as_text(0.25, "x")) == ("a", "5", "0.25")
    for value, kind in (({"a": 1}, "a mapping"), ([1], "a list"), (True, "a boolean")):
        with pytest.raises(DataError, match=rf"^column `q` holds {kind}, not text"):
            as_text(value, "column `q`")
    row = {"instruction": ["a"], "output": "x"}
    with pytest.raises(DataError, match="column `instruction` holds a list"):
        get_strategy(DatasetEntry(path="x", type="alpaca"), 0, False).sample(row)
    strategy = get_strategy(DatasetEntry(path="x", type="chat_template"), 0, False)
    row = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}
    assert strategy.sample(row).messages[0]["content"] == "5"
    row["messages"][1]["content"] = {"text": "ok"}
    with pytest.raises(DataError, match="message 1 of `messages`: `content` holds a mapping"):
        strategy.sample(row)


# -- 3. val_set_size: a fraction below 1 or a whole number of rows --------------------------------


@pytest.mark.parametrize("value", [1.5, 2.25, 10.01])
def test_val_set_size_neither_fraction_nor_count_is_an_error(tmp_path, value):
    result = validate(tmp_path, datasets=[{"path": "d.jsonl", "type": "alpaca"}], val_set_size=value)
    assert result.returncode == 2
    err = one_line(result.stderr)
    assert "`val_set_size` (" in err and "line 5" in err
    assert f"{value} is neither a fraction below 1 (e.g. 0.05: 5% of the rows) nor a whole" in err


@pytest.mark.parametrize("value", [0, 0.05, 0.999, 1, 4, 4.0, 100])
def test_val_set_size_fraction_or_count_validates(value):
    cfg = NewtuneConfig(base_model="m", datasets=[{"path": "d", "type": "alpaca"}], val_set_size=value)
    assert cfg.val_set_size == value


# -- 4. nothing flows backwards ------------------------------------------------------------------


def _newtune_imports(path: Path) -> set[str]:
    """Every newtune module a file imports (anywhere in it, TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("newtune")}
        elif isinstance(node, ast.ImportFrom) and node.module == "newtune":
            found |= {f"newtune.{a.name}" for a in node.names}  # from newtune import fileio
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("newtune."):
            found.add(node.module)
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("config", ("newtune.data", "newtune.models", "newtune.train", "newtune.cli", "newtune.api")),
        ("data", ("newtune.train", "newtune.cli", "newtune.api")),
    ],
)
def test_lower_layers_never_import_higher_ones(package, forbidden):
    bad = {
        f"{path.relative_to(SRC)} imports {module}"
        for path in (SRC / package).rglob("*.py")
        for module in _newtune_imports(path)
        if module in forbidden or module.startswith(tuple(f"{f}." for f in forbidden))
    }
    assert not bad


def test_config_loads_in_a_fresh_interpreter_without_data_code():
    code = (
        "import sys, newtune.config.load, newtune.config.rules, newtune.config.docs;"
        "print(sorted(m for m in sys.modules if m.startswith(('newtune.data', 'newtune.train.',"
        " 'newtune.models', 'newtune.api'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- 5/6. no internal milestones in what a user reads ---------------------------------------------


def test_key_statuses_name_no_internal_work():
    from newtune.config.docs import render

    statuses = {status_of(i)["status"] for i in NewtuneConfig.model_fields.values()}
    assert statuses == {"implemented", "not implemented", "ignored"}
    text = render()
    assert "planned" not in text and "piece of work" not in text
    assert "`flash_attn_rms_norm` | not implemented; instead: `liger_rms_norm: true`" in text
