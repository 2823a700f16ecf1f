"""Dataset sources: local files and folders, http(s), S3 (moto on loopback), hub, shards."""

from __future__ import annotations

import functools
import http.server
import json
import sys
import threading
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from conftest import write_jsonl
from pydantic import ValidationError

from newtune.config.schema import DatasetEntry
from newtune.data import sources
from newtune.data.sources import is_pretokenized, load_rows, local_files, pretokenized
from newtune.errors import DataError

ROWS = [{"q": f"q{i}", "a": i} for i in range(5)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test gets its own datasets cache, so nothing is reused between tests."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def entry(path, **kw) -> DatasetEntry:
    return DatasetEntry(path=str(path), **kw)


def rows(ds: datasets.Dataset) -> list[dict]:
    return ds.to_list()


# local files --------------------------------------------------------------------------


def test_each_local_format(tmp_path):
    data = datasets.Dataset.from_list(ROWS)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))  # a JSON document, not JSON lines
    data.to_csv(tmp_path / "d.csv", index=False)
    data.to_parquet(tmp_path / "d.parquet")
    table = data.data.table
    with pa.ipc.new_stream(str(tmp_path / "d.arrow"), table.schema) as writer:
        writer.write_table(table)
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "d.arrow"):
        assert rows(load_rows(entry(tmp_path / name), 0)) == ROWS, name
    (tmp_path / "d.txt").write_text("first line\nsecond line\n")
    assert rows(load_rows(entry(tmp_path / "d.txt"), 0)) == [
        {"text": "first line"},
        {"text": "second line"},
    ]


def test_ds_type_overrides_the_extension(tmp_path):
    write_jsonl(tmp_path / "d.data", ROWS)
    assert rows(load_rows(entry(tmp_path / "d.data", ds_type="jsonl"), 0)) == ROWS
    with pytest.raises(DataError) as info:
        load_rows(entry(tmp_path / "d.data"), 3)
    assert str(info.value) == (
        f"datasets[3]: cannot tell the format of {tmp_path / 'd.data'} from its extension; "
        "set `ds_type` to one of json, jsonl, csv, parquet, arrow, text."
    )


def test_wrong_ds_type_names_the_choices():
    with pytest.raises(ValidationError) as info:
        DatasetEntry(path="d.xml", ds_type="xml")
    assert "'json', 'jsonl', 'csv', 'parquet', 'arrow' or 'text'" in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_rows(entry(missing), 1)
    assert str(info.value) == (
        f"datasets[1].path: {missing} does not exist (looked in {Path.cwd()}). "
        "Fix the path; relative paths are resolved from the current directory."
    )
    assert local_files(entry(missing), 1) is None


# local folders -------------------------------------------------------------------------


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert rows(load_rows(entry(tmp_path / "one"), 0)) == ROWS
    assert sorted(Path(f).name for f in local_files(entry(tmp_path / "one"), 0)) == [
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "state.json",
    ]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:2]),
            "test": datasets.Dataset.from_list(ROWS[4:]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    assert rows(load_rows(entry(tmp_path / "dict"), 0)) == ROWS[:2]
    assert rows(load_rows(entry(tmp_path / "dict", split="test"), 0)) == ROWS[4:]
    assert rows(load_rows(entry(tmp_path / "dict", train_on_split="test"), 0)) == ROWS[4:]
    with pytest.raises(DataError) as info:
        load_rows(entry(tmp_path / "dict", split="validation"), 2)
    assert str(info.value) == (
        f"datasets[2]: {tmp_path / 'dict'} has split(s) train, test but not `validation`. "
        "Set `split` (or `train_on_split`) to one of them."
    )


def test_folder_of_files_and_data_files(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", ROWS[:2])
    write_jsonl(folder / "part-1.jsonl", ROWS[2:])
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("not json")
    assert rows(load_rows(entry(folder), 0)) == ROWS
    assert local_files(entry(folder), 0) == [
        str(folder / "part-0.jsonl"),
        str(folder / "part-1.jsonl"),
    ]
    assert rows(load_rows(entry(folder, data_files="part-1.jsonl"), 0)) == ROWS[2:]
    assert rows(load_rows(entry(folder, data_files=["part-*.jsonl"]), 0)) == ROWS
    with pytest.raises(DataError) as info:
        load_rows(entry(folder, data_files=["part-1.jsonl", "part-9.jsonl"]), 0)
    assert str(info.value) == (
        f"datasets[0]: data file(s) part-9.jsonl not found in {folder}. Check `data_files`; "
        "names are relative to `path` and may use * wildcards."
    )


def test_folder_splits_by_file_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "test.jsonl", ROWS[3:])
    assert rows(load_rows(entry(tmp_path), 0)) == ROWS[:3]
    assert rows(load_rows(entry(tmp_path, split="test"), 0)) == ROWS[3:]
    with pytest.raises(DataError) as info:
        load_rows(entry(tmp_path, split="validation"), 0)
    assert str(info.value) == (
        f"datasets[0]: folder {tmp_path} holds files of split(s) test, train (by their names) "
        "but none of split `validation`. Set `split` to one of them, or `data_files`."
    )


def test_folder_with_mixed_or_no_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS[:1]).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError) as info:
        load_rows(entry(tmp_path), 0)
    assert str(info.value) == (
        f"datasets[0]: folder {tmp_path} mixes data files of formats csv, jsonl. Set "
        "`data_files` to the files to read, or `ds_type` to read only one format."
    )
    assert rows(load_rows(entry(tmp_path, ds_type="csv"), 0)) == ROWS[:1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        load_rows(entry(empty), 0)
    assert str(info.value) == (
        f"datasets[0]: folder {empty} holds no data files (.json, .jsonl, .csv, .parquet, "
        ".arrow, .txt). Point `path` at a data file or a `save_to_disk` folder, or set "
        "`data_files`."
    )


# bad JSON ------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,}\n{"a": 4}\n')
    with pytest.raises(DataError) as info:
        load_rows(entry(data), 0)
    assert str(info.value) == (
        f"datasets[0]: {data} line 4 is not valid JSON (Expecting property name enclosed in "
        "double quotes, column 9). Fix or remove that line; a .jsonl file holds one JSON "
        "object per line."
    )


def test_malformed_json_document_and_json_lines_named_json(tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"a": 1},\n  {"a": 2}\n  {"a": 3}\n]\n')
    with pytest.raises(DataError) as info:
        load_rows(entry(doc), 0)
    assert str(info.value).startswith(
        f"datasets[0]: {doc} line 4 is not valid JSON (Expecting ',' delimiter)."
    )
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError) as info:
        load_rows(entry(lines), 0)
    assert str(info.value).startswith(
        f"datasets[0]: {lines} line 2 is not valid JSON (a JSON list, not an object)."
    )


# http(s) -------------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A loopback http server for `tmp_path/www`; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_url(http_root, monkeypatch):
    root, base = http_root
    write_jsonl(root / "d.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(root / "d.parquet")
    (root / "d.data").write_text("a\nb\n")
    assert rows(load_rows(entry(f"{base}/d.jsonl"), 0)) == ROWS
    assert rows(load_rows(entry(f"{base}/d.parquet?download=1"), 0)) == ROWS
    assert rows(load_rows(entry(f"{base}/d.data", ds_type="text"), 0)) == [
        {"text": "a"},
        {"text": "b"},
    ]
    assert rows(load_rows(entry(base, data_files=["d.jsonl"]), 0)) == ROWS
    assert local_files(entry(f"{base}/d.jsonl"), 0) is None

    (root / "bad.jsonl").write_text('{"a": 1}\n{oops}\n')
    with pytest.raises(DataError) as info:
        load_rows(entry(f"{base}/bad.jsonl"), 0)
    assert str(info.value).startswith(f"datasets[0]: {base}/bad.jsonl line 2 is not valid JSON")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_rows(entry(f"{base}/d.parquet"), 0)
    assert str(info.value) == (
        f"datasets[0]: could not read {base}/d.parquet as parquet: OfflineModeIsEnabled: "
        f"Offline mode is enabled. Tried to reach {base}/d.parquet. Check the file, or set "
        "`ds_type` (one of json, jsonl, csv, parquet, arrow, text) if its extension misleads. "
        "HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) also stops `datasets` from reading "
        "http/s3/gs URLs; unset it for this run."
    )


# S3 (moto server on loopback) ----------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url():
    """A moto S3 server on a random loopback port."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_url, monkeypatch, tmp_path, request):
    """A fresh bucket on the moto server, with the environment a user would set."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": moto_url,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    bucket = "newtune-" + request.node.name.replace("_", "-")[:40].lower()
    client = boto3.client("s3", endpoint_url=moto_url)
    client.create_bucket(Bucket=bucket)
    return client, bucket


def test_s3_file_folder_and_save_to_disk(s3):
    client, bucket = s3
    body = "".join(json.dumps(r) + "\n" for r in ROWS)
    client.put_object(Bucket=bucket, Key="one/d.jsonl", Body=body.encode())
    client.put_object(Bucket=bucket, Key="parts/train-0.jsonl", Body=body.encode())
    client.put_object(Bucket=bucket, Key="parts/test-0.jsonl", Body=b'{"q": "t", "a": 9}\n')
    assert rows(load_rows(entry(f"s3://{bucket}/one/d.jsonl"), 0)) == ROWS
    assert rows(load_rows(entry(f"s3://{bucket}/parts"), 0)) == ROWS
    assert rows(load_rows(entry(f"s3://{bucket}/parts/", split="test"), 0)) == [{"q": "t", "a": 9}]
    assert local_files(entry(f"s3://{bucket}/one/d.jsonl"), 0) is None

    options = sources.storage_options(f"s3://{bucket}")
    assert options == {"client_kwargs": {"endpoint_url": client.meta.endpoint_url}}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(
        f"s3://{bucket}/disk", storage_options=options
    )
    assert rows(load_rows(entry(f"s3://{bucket}/disk"), 0)) == ROWS[:2]

    with pytest.raises(DataError) as info:
        load_rows(entry(f"s3://{bucket}/nothing/here.jsonl"), 0)
    assert str(info.value) == (
        f"datasets[0].path: s3://{bucket}/nothing/here.jsonl does not exist. "
        "Check the bucket and key."
    )


@pytest.mark.parametrize(
    ("url", "package"),
    [("s3://bucket/d.jsonl", "s3fs"), ("gs://bucket/d", "gcsfs"), ("https://h/d.csv", "aiohttp")],
)
def test_remote_url_needs_its_fs_package(monkeypatch, url, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    scheme = url.split(":")[0]
    with pytest.raises(DataError) as info:
        load_rows(entry(url), 2)
    assert str(info.value) == (
        f"datasets[2].path: {url} is a {scheme}:// URL, which needs the `{package}` package; "
        "run `pip install 'newtune[cloud]'`."
    )


# hub -----------------------------------------------------------------------------------


def test_hub_failure_names_what_was_tried(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_rows(entry("someone/missing-ds", name="cfg", revision="v1", train_on_split="dev"), 0)
    assert str(info.value) == (
        f"datasets[0].path: someone/missing-ds is not a local file or folder (looked in "
        f"{Path.cwd()}), and loading it from the Hugging Face hub with name='cfg', "
        "split='dev', revision='v1' failed (ConnectionError: Couldn't reach "
        "'someone/missing-ds' on the Hub (OfflineModeIsEnabled)). Fix the path, or check the "
        "dataset id, config name, split and revision and your network/HF_TOKEN; with "
        "HF_HUB_OFFLINE=1 only datasets already in the local cache load."
    )


def test_hub_name_list_is_concatenated_then_sharded(monkeypatch):
    calls = []

    def fake_load(path, name=None, **kw):
        calls.append((path, name, kw))
        return datasets.Dataset.from_list([{"cfg": name, "i": i} for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_rows(entry("org/data", name=["x", "y"], revision="abc", split="validation"), 0)
    assert rows(ds) == [{"cfg": c, "i": i} for c in ("x", "y") for i in range(3)]
    assert calls == [
        ("org/data", n, {"split": "validation", "revision": "abc", "data_files": None})
        for n in ("x", "y")
    ]
    sharded = load_rows(entry("org/data", name=["x", "y"], shards=4), 0)
    assert rows(sharded) == [{"cfg": "x", "i": 0}, {"cfg": "x", "i": 1}]


def test_hub_configs_with_different_column_types(monkeypatch):
    def fake_load(path, name=None, **kw):
        return datasets.Dataset.from_list([{"v": 1 if name == "x" else "one"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(DataError) as info:
        load_rows(entry("org/data", name=["x", "y"]), 0)
    message = str(info.value)
    assert message.startswith(
        "datasets[0]: the configurations x, y of org/data cannot be concatenated (ValueError: "
    )
    assert message.endswith(
        "List only configurations whose columns have the same types, or use one `datasets:` "
        "entry per configuration."
    )


# shards and pretokenized data ------------------------------------------------------------


def test_shards_keep_the_first_shard(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(10)])
    assert rows(load_rows(entry(data, shards=3), 0)) == [{"i": i} for i in range(4)]
    assert rows(load_rows(entry(data, shards=1), 0)) == [{"i": i} for i in range(10)]
    with pytest.raises(ValidationError):
        entry(data, shards=0)


def test_pretokenized(tmp_path):
    data = write_jsonl(
        tmp_path / "tok.jsonl",
        [
            {"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1]},
            {"input_ids": [1, 7], "attention_mask": [1, 1], "labels": [-100, 7]},
        ],
    )
    ds = load_rows(entry(data), 0)
    assert is_pretokenized(ds)
    assert not is_pretokenized(datasets.Dataset.from_list(ROWS))
    assert not is_pretokenized(datasets.Dataset.from_list([{"input_ids": "1 2 3"}]))
    assert rows(pretokenized(ds, "datasets[0]")) == [
        {"input_ids": [1, 5, 6], "labels": [1, 5, 6]},
        {"input_ids": [1, 7], "labels": [-100, 7]},
    ]
    padded = datasets.Dataset.from_list([{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}])
    with pytest.raises(DataError) as info:
        pretokenized(padded, "datasets[1]")
    assert str(info.value) == (
        "datasets[1] row 0: `attention_mask` is not all ones, so the row holds padding. "
        "Store rows without padding (newtune pads each batch), or drop the column."
    )
    short = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(DataError) as info:
        pretokenized(short, "datasets[0]")
    assert str(info.value) == (
        "datasets[0] row 0: `labels` has 2 entries but `input_ids` has 3. Make them the same "
        "length (use -100 for untrained tokens)."
    )
