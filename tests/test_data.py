import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flexmoe.data import data_fingerprint, load_splits, pack, read_documents
from flexmoe.errors import FlexmoeError


def test_reads_txt_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet doc", ""]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert read_documents([tmp_path]) == ["plain text document", "json one", "json two", "parquet doc"]


def test_demo_layout_keeps_its_splits(demo_data):
    s = load_splits([demo_data / "math"])
    valid_file = [
        json.loads(x)["text"] for x in (demo_data / "math" / "valid.jsonl").read_text().splitlines()
    ]
    assert s.valid == valid_file and len(s.train) > len(s.valid)


def test_hash_split_is_order_independent(tmp_path):
    docs = [f"document number {i} " * 5 for i in range(200)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "y.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    a, b = load_splits([tmp_path / "x.jsonl"]), load_splits([tmp_path / "y.jsonl"])
    assert set(a.valid) == set(b.valid) and 0 < len(a.valid) < 40


def test_missing_text_field_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(FlexmoeError, match="no string field 'text'"):
        load_splits([tmp_path])


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(FlexmoeError, match="no column 'text'"):
        load_splits([tmp_path])


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(FlexmoeError, match="does not exist"):
        load_splits([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlexmoeError, match="No usable text"):
        load_splits([tmp_path / "empty"])


def test_pack_and_too_little_data():
    blocks = pack([[1, 2, 3], [4, 5, 6, 7]], 3)
    assert torch.equal(blocks, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(FlexmoeError, match="fewer than one sequence"):
        pack([[1, 2]], 3)


def test_data_fingerprint_is_sensitive():
    assert data_fingerprint(["ab", "c"]) != data_fingerprint(["a", "bc"])
    assert data_fingerprint(["ab", "c"]) == data_fingerprint(["ab", "c"])
