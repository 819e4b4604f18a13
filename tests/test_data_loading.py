"""Record loading and validation, the tokenized cache, and the prepare CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c2a.data import CacheMismatchError, DataError, TokenizedDataset, Tokenizer, encode_example, load_records
from c2a.data.demo import DEMO_TOKENIZER, demo_split, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOOD = [
    {"instruction": "Copy the text.", "input": "cat dog", "output": "cat dog"},
    {"instruction": "What is 2 + 3?", "output": "5"},  # no input field: allowed
    {"instruction": "Count the words: cat", "input": None, "output": "1"},  # null input: ""
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_json_jsonl_parquet(tmp_path: Path) -> None:
    expected = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in GOOD]
    (tmp_path / "a.json").write_text(json.dumps(GOOD))
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in GOOD])
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in GOOD))  # JSON lines named .json
    pq.write_table(pa.Table.from_pylist([dict(r, input=r.get("input")) for r in GOOD]), tmp_path / "a.parquet")
    for name in ("a.json", "a.jsonl", "lines.json", "a.parquet"):
        loaded = load_records(tmp_path / name)
        assert loaded.records == expected, name
        assert loaded.source["kind"] == "file" and len(loaded.source["sha256"]) == 64 and loaded.skipped == []


def test_load_raw_line_separators_byte_order_mark_and_one_line_json(tmp_path: Path) -> None:
    # JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(ensure_ascii=False) writes them so)
    odd = {"instruction": "Join\u2028these\u2029lines\x85now", "input": "", "output": "ok"}
    lines = [json.dumps(odd, ensure_ascii=False), json.dumps(GOOD[0])]
    _write_jsonl(tmp_path / "sep.jsonl", lines)
    assert load_records(tmp_path / "sep.jsonl").records[0] == odd
    (tmp_path / "bom.json").write_text(json.dumps([odd]), encoding="utf-8-sig")  # as some Windows editors save
    assert load_records(tmp_path / "bom.json").records == [odd]
    (tmp_path / "one.json").write_text(json.dumps(odd) + "\n")  # JSON lines of a single record, named .json
    assert load_records(tmp_path / "one.json").records == [odd]
    (tmp_path / "obj.json").write_text(json.dumps({"data": [odd]}, indent=1))  # an object is still refused
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(tmp_path / "obj.json")


BAD_ROWS = [
    ('{"instruction": "x", "output": "y"', "invalid JSON"),
    ('{"input": "a", "output": "y"}', "missing field 'instruction'"),
    ('{"instruction": "x", "input": "a"}', "missing field 'output'"),
    ('{"instruction": 3, "output": "y"}', "'instruction' must be a string"),
    ('{"instruction": "x", "input": ["a"], "output": "y"}', "'input' must be a string"),
    ('{"instruction": "x", "output": "  "}', "'output' is empty"),
    ('["x", "y"]', "expected an object"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, bad: str, reason: str) -> None:
    lines = [json.dumps(GOOD[0]), "", json.dumps(GOOD[1]), bad, json.dumps(GOOD[2])]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"d\.jsonl:4: .*{reason}"):
        load_records(path)
    loaded = load_records(path, skip_bad_rows=True)
    assert len(loaded.records) == 3 and len(loaded.skipped) == 1 and "d.jsonl:4" in loaded.skipped[0]


def test_malformed_json_and_parquet_name_the_row(tmp_path: Path) -> None:
    rows = [GOOD[0], GOOD[1], {"instruction": "x", "output": ""}, GOOD[2], {"instruction": "x"}]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=r"d\.json row 2: field 'output' is empty"):
        load_records(tmp_path / "d.json")
    assert len(load_records(tmp_path / "d.json", skip_bad_rows=True).skipped) == 2
    (tmp_path / "broken.json").write_text('[\n {"instruction": "x", "output": "y"},\n {"instruction": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        load_records(tmp_path / "broken.json")
    table = pa.Table.from_pylist(
        [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": "", "output": None}]
    )
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 1: field 'output' must be a string, got NoneType"):
        load_records(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "response": "b"}]), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet row 0: missing field 'output'"):
        load_records(tmp_path / "cols.parquet")
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "missing.jsonl")


def test_hub_name_without_network_is_a_clear_error() -> None:
    # conftest sets HF_DATASETS_OFFLINE=1: a name that is not cached fails fast, naming the dataset
    with pytest.raises(DataError, match="cannot load dataset 'c2a-test/no-such-dataset'"):
        load_records("c2a-test/no-such-dataset")


def test_from_records_matches_encode_example_and_counts(tmp_path: Path) -> None:
    tok = Tokenizer(DEMO_TOKENIZER)
    records = demo_split(n_train=300, n_heldout=0, seed=5)[0]
    records.append({"instruction": " ".join(["cat"] * 100), "input": "", "output": "dog"})
    ds = TokenizedDataset.from_records(records, tok, max_len=96)
    assert len(ds) == len(records)
    for i in (0, 17, 299, 300):
        ids, labels = encode_example(records[i], tok, 96)
        assert ds[i][0].tolist() == ids and ds[i][1].tolist() == labels
    c = ds.manifest["counts"]
    assert c["truncated"] == 1 and c["dropped"] == 0 and c["examples"] == 301
    assert c["tokens"] == int(ds.lengths.sum()) and c["trained_tokens"] == int((ds.labels != -100).sum())
    dropped = TokenizedDataset.from_records(records, tok, max_len=96, truncation="drop")
    assert len(dropped) == 300 and dropped.manifest["counts"]["dropped"] == 1
    # parallel workers give the identical arrays
    many = demo_split(n_train=2500, n_heldout=0, seed=6)[0]
    serial, parallel = (TokenizedDataset.from_records(many, tok, 96, workers=w) for w in (1, 2))
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name))


def _prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "c2a.data.prepare", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_prepare_cli_end_to_end(tmp_path: Path) -> None:
    records = demo_split(n_train=2200, n_heldout=0, seed=7)[0]
    data = _write_jsonl(
        tmp_path / "train.jsonl", [json.dumps({k: r[k] for k in ("instruction", "input", "output")}) for r in records]
    )
    out = tmp_path / "cache"
    res = _prepare(
        "--data", str(data), "--tokenizer", str(DEMO_TOKENIZER), "--out", str(out), "--max-len", "96", "--workers", "2"
    )
    assert res.returncode == 0, res.stderr
    for word in ("examples", "tokens", "trained tokens", "truncated", "p50", "p99"):
        assert word in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_len"] == 96 and manifest["counts"]["examples"] == 2200 and manifest["format_version"] == 1
    assert manifest["source"]["sha256"] == load_records(data).source["sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary dir left

    tok = Tokenizer(DEMO_TOKENIZER)
    ds = TokenizedDataset.open(out, expect_tokenizer=DEMO_TOKENIZER, expect_max_len=96, expect_source=data)
    assert isinstance(ds.input_ids, np.memmap) and len(ds) == 2200
    reference = TokenizedDataset.from_records(records, tok, 96)
    for name in ("input_ids", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(ds, name), getattr(reference, name))

    # a cache built differently is refused, naming what differs
    other_tok = make_tokenizer(tmp_path / "other.model", seed=1)
    with pytest.raises(CacheMismatchError, match="tokenizer sha256"):
        TokenizedDataset.open(out, expect_tokenizer=other_tok)
    with pytest.raises(CacheMismatchError, match="max_len is 96, expected 2048"):
        TokenizedDataset.open(out, expect_max_len=2048)
    changed = _write_jsonl(tmp_path / "changed.jsonl", data.read_text().splitlines()[:-1])
    with pytest.raises(CacheMismatchError, match="source file sha256"):
        TokenizedDataset.open(out, expect_source=changed)
    with pytest.raises(CacheMismatchError, match="expected the hub dataset"):
        TokenizedDataset.open(out, expect_source="umd-zhou-lab/claude2_alpaca")

    # an existing cache is not overwritten by accident
    res = _prepare("--data", str(data), "--tokenizer", str(DEMO_TOKENIZER), "--out", str(out), "--max-len", "64")
    assert res.returncode == 1 and "--overwrite" in res.stderr
    res = _prepare(
        "--data",
        str(data),
        "--tokenizer",
        str(DEMO_TOKENIZER),
        "--out",
        str(out),
        "--max-len",
        "64",
        "--overwrite",
        "--workers",
        "1",
    )
    assert res.returncode == 0, res.stderr
    assert TokenizedDataset.open(out, expect_max_len=64).max_len == 64


def test_prepare_cli_bad_rows(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD[0]), '{"instruction": "x"}', json.dumps(GOOD[1])])
    args = ["--data", str(data), "--tokenizer", str(DEMO_TOKENIZER), "--max-len", "64", "--workers", "1"]
    res = _prepare(*args, "--out", str(tmp_path / "c1"))
    assert res.returncode == 1 and "d.jsonl:2: missing field 'output'" in res.stderr and "--skip-bad-rows" in res.stderr
    assert not (tmp_path / "c1").exists()
    res = _prepare(*args, "--out", str(tmp_path / "c2"), "--skip-bad-rows")
    assert res.returncode == 0, res.stderr
    counts = json.loads((tmp_path / "c2" / "manifest.json").read_text())["counts"]
    assert counts["skipped_bad_rows"] == 1 and counts["examples"] == 2 and counts["records"] == 3
