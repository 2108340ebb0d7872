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


def test_an_eval_file_that_is_the_train_file_is_named_in_a_warning(tmp_path, caplog):
    """Allowed (tiny runs do it), but the checkpoint would be chosen on records the model trains on: said once."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"instruction": "say {w}", "output": "{w}"}}\n' for w in ("red", "blue", "green")))
    with caplog.at_level("WARNING", logger="lorakit.data.dataset"):
        train, evaluation, _ = read_records(DataConfig(train_file=str(path), eval_file=str(tmp_path / ".." /
                                                                                          tmp_path.name / "d.jsonl")), 0)
    assert len(train) == len(evaluation) == 3
    assert [r.getMessage() for r in caplog.records if "is data.train_file" in r.getMessage()] != []
