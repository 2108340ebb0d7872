"""The E2E NLG adapter: CSV and lora_format parsing, MR rendering, reference grouping, the data format."""

from pathlib import Path

import pytest

from lorakit.config import DataConfig
from lorakit.data.dataset import read_records
from lorakit.data.e2e import (
    aligned_references,
    group_references,
    parse_mr,
    read_e2e_csv,
    read_e2e_records,
    read_lora_format,
    render_mr,
)
from lorakit.data.formats import DataError

E2E = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e2e"
needs_data = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")

# Quoted commas, a quoted CRLF inside a reference, CRLF line ends: what the official train/dev files hold.
CSV_TEXT = (
    'mr,ref\r\n'
    '"name[The Vaults], eatType[pub], priceRange[more than £30]","The Vaults is a pub, pricey."\r\n'
    '"name[The Vaults], eatType[pub], priceRange[more than £30]","A pricey pub:\r\nThe Vaults."\r\n'
    '"name[Blue Spice], area[riverside]","Blue Spice is by the river."\r\n'
)
LORA_TEXT = (
    "name : The Vaults | Type : pub | price : more than £30||The Vaults is a pub , pricey . \n"
    "name : The Vaults | Type : pub | price : more than £30||A pricey pub : The Vaults . \n"
    "name : Blue Spice | area : riverside||Blue Spice is by the river . \n"
)


def test_parse_and_render_mr():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30], familyFriendly[no], near[Café Adriatic]"
    assert parse_mr(mr)[:2] == [("name", "The Vaults"), ("eatType", "pub")]
    assert render_mr(mr) == (
        "name: The Vaults | type: pub | price: more than £30 | family friendly: no | near: Café Adriatic"
    )
    # Deterministic: the canonical attribute order whatever order the MR is written in.
    assert render_mr("near[X], customer rating[5 out of 5], name[Y]") == "name: Y | customer rating: 5 out of 5 | near: X"


def test_bad_mr_is_one_line_error_naming_the_row():
    with pytest.raises(DataError, match=r"train.csv:7: meaning representation .* key\[value\]"):
        parse_mr("name[The Vaults], eatType pub", at="train.csv:7")


def test_read_csv_with_quoted_commas_and_line_breaks(tmp_path):
    path = tmp_path / "part.csv"
    path.write_bytes(CSV_TEXT.encode("utf-8"))
    rows = read_e2e_csv(path)
    assert [r["ref"] for r in rows] == ["The Vaults is a pub, pricey.", "A pricey pub:\r\nThe Vaults.", "Blue Spice is by the river."]
    assert [r["_line"] for r in rows] == [2, 3, 5]  # the third record starts after the quoted line break
    assert read_e2e_records(path)[1]["output"] == "A pricey pub: The Vaults."  # one space for the break


def test_glob_joins_parts_in_name_order(tmp_path):
    (tmp_path / "train.part2of2.csv").write_text('mr,ref\n"name[B]","b."\n', encoding="utf-8")
    (tmp_path / "train.part1of2.csv").write_text('mr,ref\n"name[A]","a."\n', encoding="utf-8")
    records = read_e2e_records(tmp_path / "train.part*of2.csv")
    assert [(r["instruction"], r["output"]) for r in records] == [("name: A", "a."), ("name: B", "b.")]


def test_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('mr,ref\n"name[A]","a.",extra\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:2: expected 2 columns"):
        read_e2e_csv(path)
    path.write_text("meaning,text\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:1: expected the E2E header mr,ref"):
        read_e2e_csv(path)
    with pytest.raises(FileNotFoundError):
        read_e2e_csv(tmp_path / "nothing.part*.csv")


def test_lora_format_and_alignment(tmp_path):
    (tmp_path / "test.csv").write_bytes(CSV_TEXT.encode("utf-8"))
    (tmp_path / "test.txt").write_text(LORA_TEXT + "\n", encoding="utf-8")
    lora_rows = read_lora_format(tmp_path / "test.txt")
    assert lora_rows[0] == {**lora_rows[0], "mr": "name : The Vaults | Type : pub | price : more than £30",
                            "ref": "The Vaults is a pub , pricey ."}
    grouped = group_references(read_e2e_csv(tmp_path / "test.csv"))
    assert len(grouped) == 2 and grouped.prompts[1] == "name: Blue Spice | area: riverside"
    assert [len(r) for r in grouped.references] == [2, 1]
    tokenised = aligned_references(grouped, lora_rows)
    assert tokenised == [["The Vaults is a pub , pricey .", "A pricey pub : The Vaults ."], ["Blue Spice is by the river ."]]
    assert grouped.take(1).references == [grouped.references[0]]
    with pytest.raises(DataError, match="row i must match row i"):
        aligned_references(grouped, lora_rows[:2])
    (tmp_path / "broken.txt").write_text("name : A | Type : pub\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.txt:1: .* no '\|\|'"):
        read_lora_format(tmp_path / "broken.txt")


@needs_data
def test_real_files_group_into_the_official_counts():
    test = group_references(read_e2e_csv(E2E / "original" / "testset_w_refs.csv"))
    assert len(test) == 630 and sum(map(len, test.references)) == 4693
    lora = read_lora_format(E2E / "lora_format" / "test.txt")
    assert len(lora) == 4693
    tokenised = aligned_references(test, lora)
    assert [len(r) for r in tokenised] == [len(r) for r in test.references]
    lora_groups = group_references(lora)  # grouping by loralib's own MR text agrees
    assert len(lora_groups) == 630 and lora_groups.rows == test.rows
    dev = group_references(read_e2e_csv(E2E / "original" / "devset.csv"))
    assert len(dev) == 547 and sum(map(len, dev.references)) == 4672


@needs_data
def test_train_parts_through_the_data_config():
    config = DataConfig(
        format="e2e", train_file=str(E2E / "original" / "trainset.part*of3.csv"),
        eval_file=str(E2E / "original" / "devset.csv"), max_train_examples=300, max_eval_examples=20,
    )
    everything = read_e2e_records(config.train_file)
    assert len(everything) == 42061
    train, evaluation, fmt = read_records(config, seed=0)
    assert fmt == "instruction" and len(train) == 300 and len(evaluation) == 20
    assert train == read_records(config, seed=0)[0]  # the sample is seeded, so reproducible
    assert train[0]["instruction"].startswith("name: ") and train[0]["output"]


def test_the_example_config_is_valid_and_under_one_percent():
    from lorakit.config_loading import load_run_config

    config = load_run_config(Path(__file__).resolve().parents[2] / "examples" / "e2e" / "config.yaml")
    assert config.data.format == "e2e" and config.train.max_minutes == 55
    # r on all seven SmolLM2-135M projections: 30 layers x r x (in + out) summed over q, k, v, o, gate, up, down.
    per_layer = sum(a + b for a, b in [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)])
    assert 30 * config.lora.r * per_layer / (134_515_008 + 30 * config.lora.r * per_layer) < 0.01
