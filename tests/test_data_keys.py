"""`push_dataset_to_hub` and `dataset_keep_in_memory` reach the datasets calls that do them."""

from __future__ import annotations

import datasets
import pytest
from conftest import write_jsonl
from test_cli import ALPACA, cli, make_config

from newtune.cli.preprocess import preprocess_command
from newtune.data import prepare as prepare_module


def test_push_dataset_to_hub_pushes_the_prepared_splits(tmp_path, model_dir, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = make_config(
        tmp_path, model_dir, data, "alpaca", push_dataset_to_hub="me/prepared", val_set_size=0.25
    )
    calls = []

    def push_to_hub(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs, {k: len(v) for k, v in self.items()}))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", push_to_hub)
    preprocess_command(str(cfg))
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    fingerprint = folder.rsplit("/", 1)[-1]
    assert calls == [
        ("me/prepared", {"config_name": fingerprint, "private": True}, {"train": 9, "test": 3})
    ]


def test_push_dataset_to_hub_failure_is_a_data_error(tmp_path, model_dir, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = make_config(tmp_path, model_dir, data, "alpaca", push_dataset_to_hub="me/prepared")

    def push_to_hub(self, repo_id, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", push_to_hub)
    with pytest.raises(SystemExit) as exit_info:
        preprocess_command(str(cfg))
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "Traceback" not in err
    assert "`push_dataset_to_hub: me/prepared`: pushing the prepared data failed " in err
    assert "(ConnectionError: offline); it is saved locally" in err


@pytest.mark.parametrize("keep", [True, None])
def test_dataset_keep_in_memory_reaches_load_from_disk(tmp_path, model_dir, monkeypatch, keep):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    extra = {"dataset_keep_in_memory": True} if keep else {}
    cfg = make_config(tmp_path, model_dir, data, "alpaca", **extra)
    real, seen = datasets.load_from_disk, []

    def load_from_disk(path, **kwargs):
        seen.append(kwargs.get("keep_in_memory"))
        return real(path, **kwargs)

    monkeypatch.setattr(prepare_module.datasets, "load_from_disk", load_from_disk)
    preprocess_command(str(cfg))
    assert seen == [keep]


def test_preprocess_of_a_pretraining_config_says_it_streams(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        f"base_model: {model_dir}\nmax_steps: 2\noutput_dir: {tmp_path / 'out'}\n"
        f"dataset_prepared_path: {tmp_path / 'prepared'}\n"
        f"pretraining_dataset:\n  - path: {data}\n    type: pretrain\n"
    )
    proc = cli("-m", "newtune.cli.main", "preprocess", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nothing to prepare on disk" in proc.stderr
    assert not (tmp_path / "prepared").exists()


def test_gptq_is_refused_naming_what_fails(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        f"base_model: m\ndatasets:\n  - path: {data}\n    type: alpaca\n"
        "gptq: true\ngptq_disable_exllama: true\n"
    )
    proc = cli("-m", "newtune.cli.main", "validate", str(cfg))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "`gptq: True`: newtune cannot load GPTQ checkpoints here" in proc.stderr
    assert "gptqmodel 7.x requires torch>=2.14.1" in proc.stderr
    assert "`gptq_disable_exllama: True`: `gptq_disable_exllama` was removed from Axolotl" in (
        proc.stderr
    )
    cfg.write_text(cfg.read_text().replace("true", "false"))
    assert cli("-m", "newtune.cli.main", "validate", str(cfg)).returncode == 0
