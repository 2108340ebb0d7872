"""Reading the challenge's files: system outputs (MR<TAB>output), references grouped by MR, clear errors."""

from pathlib import Path

import pytest

from lorakit.data.formats import DataError
from lorakit.tasks.e2e import files
from lorakit.tasks.e2e.files import default_references, read_outputs, read_references, references_for

REFS = (
    '"mr","ref"\n'
    '"name[A], eatType[pub]","A is a pub."\n'
    '"name[B], area[riverside]","B is by the river."\n'
    '"name[A], eatType[pub]","There is a pub called A."\n'  # not next to its MR's other reference
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_outputs_as_the_challenge_reads_them(tmp_path):
    # BOM, CRLF, a quoted output, a blank line, surrounding spaces and a mis-encoded pound sign.
    text = '\ufeffMR\toutput\r\n"name[B], area[riverside]"\t"B, by the river."\r\n\r\nname[A], eatType[pub]\t A costs Â£20. \r\n'
    outputs = read_outputs(write(tmp_path / "out.tsv", text))
    assert outputs.mrs == ["name[B], area[riverside]", "name[A], eatType[pub]"]
    assert outputs.outputs == ["B, by the river.", "A costs £20."]
    assert outputs.lines == [2, 4]


def test_references_are_grouped_by_mr_in_the_outputs_order(tmp_path):
    refs = read_references(write(tmp_path / "refs.csv", REFS))
    assert refs == {"name[A], eatType[pub]": ["A is a pub.", "There is a pub called A."],
                    "name[B], area[riverside]": ["B is by the river."]}
    outputs = read_outputs(write(tmp_path / "out.tsv", "mr\tOutput\nname[B], area[riverside]\tB.\nname[A], eatType[pub]\tA.\n"))
    assert references_for(outputs, refs, "refs.csv") == [["B is by the river."], ["A is a pub.", "There is a pub called A."]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name[A]\tA is a pub.\n", r"out.tsv:1: expected the header MR<TAB>output"),
        ("MR\toutput\nname[A]\tA.\nname[B]\tB.\textra\n", r"out.tsv:3: expected 2 tab-separated fields \(MR, output\), got 3"),
        ("MR\toutput\nname[A]\tA.\n\nname[A]\tA again.\n", r"out.tsv:4: MR already given on line 2"),
        ("", r"out.tsv:1: empty file"),
        ("MR\toutput\n\n", r"out.tsv:2: no outputs after the header"),
    ],
)
def test_bad_outputs_name_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_outputs(write(tmp_path / "out.tsv", text))


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "out.tsv"
    path.write_bytes(b"MR\toutput\nname[A]\tA costs \xa320.\n")  # Latin-1 pound sign
    with pytest.raises(DataError, match=r"out.tsv:2: not UTF-8 text"):
        read_outputs(path)
    (tmp_path / "refs.csv").write_bytes(b'"mr","ref"\n"name[A]","\xa320"\n')
    with pytest.raises(DataError, match=r"refs.csv:2: not UTF-8 text"):
        read_references(tmp_path / "refs.csv")


def test_an_mr_without_references_names_the_outputs_line(tmp_path):
    refs = read_references(write(tmp_path / "refs.csv", REFS))
    outputs = read_outputs(write(tmp_path / "out.tsv", "MR\toutput\nname[A], eatType[pub]\tA.\nname[C]\tC.\n"))
    with pytest.raises(DataError, match=r"out.tsv:3: MR 'name\[C\]' has no reference in refs.csv"):
        references_for(outputs, refs, "refs.csv")


def test_missing_files_are_os_errors_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        read_outputs(tmp_path / "nothing.tsv")
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_references(tmp_path / "nothing.csv")


def test_default_references_found_beside_the_checkout_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = default_references()
    assert path.name == "testset_w_refs.csv" and path.parent.name == "original"
    assert len(read_references(path)) == 630  # the official test set's distinct MRs
    monkeypatch.setattr(files, "OFFICIAL_TEST_SET", Path("e2e") / "original" / "missing.csv")
    with pytest.raises(DataError, match="not found at .*missing.csv.*; pass --references"):
        default_references()
