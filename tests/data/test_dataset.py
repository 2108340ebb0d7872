"""data/dataset.py: a run's records read from the files its data section names."""

from __future__ import annotations

import pytest

from lorakit.config import DataConfig
from lorakit.data.dataset import read_records
from lorakit.data.formats import DataError


@pytest.mark.parametrize("field", ["train_file", "eval_file"])
def test_a_file_that_is_not_there_names_its_field_and_where_it_was_looked_for(tmp_path, monkeypatch, field):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 4)
    config = DataConfig(**{"train_file": "train.jsonl", field: "runs/missing.jsonl"})
    with pytest.raises(DataError) as missing:
        read_records(config, seed=0)
    looked = tmp_path / "runs" / "missing.jsonl"
    assert str(missing.value) == (f"data.{field}: data file not found: runs/missing.jsonl (looked for {looked}: "
                                  "a relative path starts at the current folder)")
