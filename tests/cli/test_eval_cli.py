"""`lorakit eval --task e2e --predictions OUT.tsv`: a system's saved E2E outputs scored by the challenge's rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.tasks.e2e import coco_unavailable, files, mteval
from lorakit.tasks.e2e.files import read_outputs, read_references, references_for

E2E = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e2e"
TEST_SET = E2E / "original" / "testset_w_refs.csv"


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """The first 40 of TGen's 630 challenge outputs, as a challenge-style TSV."""
    lines = (E2E / "system_outputs" / "tgen.tsv").read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("eval") / "tgen-40.tsv"
    path.write_text("\n".join(lines[:41]) + "\n", encoding="utf-8")
    return path


def expected_mteval(path: Path) -> tuple[float, float]:
    outputs = read_outputs(path)
    bleu, nist = mteval.bleu_and_nist(outputs.outputs, references_for(outputs, read_references(TEST_SET), "refs"))
    return 100 * bleu, nist


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_scores_against_the_official_test_set_by_default(capsys, subset, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no Java: METEOR, ROUGE-L and CIDEr are n/a with the reason
    code, out, _ = run(capsys, "--task", "e2e", "--predictions", str(subset), "--json", "--allow-subset")
    assert code == 0
    scores = json.loads(out)
    bleu, nist = expected_mteval(subset)
    assert scores["bleu"] == pytest.approx(bleu) and scores["nist"] == pytest.approx(nist)
    assert (scores["mrs"], scores["reference_mrs"]) == (40, 630)
    assert Path(scores["references_file"]).resolve() == TEST_SET.resolve()
    assert scores["meteor"] is None and "java" in scores["notes"]["meteor"].lower()
    assert "MT-Eval" in scores["scorer"]


@pytest.mark.slow
@pytest.mark.skipif(coco_unavailable() is not None, reason=str(coco_unavailable()))
def test_prints_the_five_challenge_metrics(capsys, subset):
    code, out, err = run(capsys, "--task", "e2e", "--predictions", str(subset), "--references", str(TEST_SET),
                         "--allow-subset")
    assert code == 0
    printed = dict(line.split(None, 1) for line in out.splitlines() if line.startswith("  ") and ":" not in line)
    assert list(printed) == ["BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"]
    bleu, nist = expected_mteval(subset)
    assert printed["BLEU"] == f"{bleu:.2f}" and printed["NIST"] == f"{nist:.4f}"
    assert 30 < float(printed["METEOR"]) < 60 and 50 < float(printed["ROUGE-L"]) < 90 and float(printed["CIDEr"]) > 1
    assert "40 of the 630 MRs" in out and "sacreBLEU" in out
    assert "590 MRs of the references have no output" in err


def test_outputs_for_some_of_the_mrs_are_refused_unless_a_subset_is_asked_for(capsys, subset):
    code, out, err = run(capsys, "--task", "e2e", "--predictions", str(subset), "--references", str(TEST_SET))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{subset}: outputs for 40 of the 630 MRs of {TEST_SET} (the first without one: " in err
    assert err.rstrip().endswith("expected one output per MR, or --allow-subset to score the given ones only")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name[A]\tA.\n", r"bad.tsv:1: expected the header MR<TAB>output"),
        ("MR\toutput\nname[Blue Spice]\tA.\n", r"bad.tsv:2: MR 'name\[Blue Spice\]' has no reference in "),
        ("MR\toutput\n\"name[Blue Spice], eatType[coffee shop], area[city centre]\"\tA\tB\n", r"bad.tsv:2: expected 2"),
    ],
)
def test_bad_predictions_are_one_line_naming_file_and_line(capsys, tmp_path, text, message):
    (tmp_path / "bad.tsv").write_text(text, encoding="utf-8")
    code, out, err = run(capsys, "--task", "e2e", "--predictions", str(tmp_path / "bad.tsv"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("lorakit eval: error: ")
    assert re.search(message, err), err


def test_missing_and_malformed_references_are_one_line(capsys, tmp_path, subset, monkeypatch):
    code, _, err = run(capsys, "--task", "e2e", "--predictions", str(subset), "--references", str(tmp_path / "none.csv"))
    assert code == 2 and "none.csv" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "refs.csv").write_text("mr\tref\nname[A]\tA.\n", encoding="utf-8")
    code, _, err = run(capsys, "--task", "e2e", "--predictions", str(subset), "--references", str(tmp_path / "refs.csv"))
    assert code == 2 and "refs.csv:1: expected the E2E header mr,ref" in err
    monkeypatch.setattr(files, "OFFICIAL_TEST_SET", Path("e2e") / "original" / "gone.csv")
    code, _, err = run(capsys, "--task", "e2e", "--predictions", str(subset))
    assert code == 2 and "gone.csv" in err and "--references" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--predictions", "out.tsv"],  # no --task e2e
        ["--task", "ros2", "--predictions", "out.tsv"],
        ["--task", "e2e", "--predictions", "out.tsv", "--model", "smollm2-135m-instruct"],
        ["--task", "e2e", "--references", "refs.csv"],  # references without predictions
        ["--task", "e2e"],  # neither a model nor predictions
    ],
)
def test_inconsistent_flags_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_eval_reads_the_challenge_csv_with_format_e2e_and_hints_at_it_without(capsys, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import toy_model_folder

    lines = TEST_SET.read_text(encoding="utf-8").splitlines()
    rows = lines[:1] + [line for line in lines[1:] if line.startswith('"name[Blue Spice], eatType[coffee shop]')][:6]
    (tmp_path / "refs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    model = toy_model_folder(tmp_path / "model")
    capsys.readouterr()  # its own progress bar
    argv = ["--model", str(model), "--data", str(tmp_path / "refs.csv"), "--template", "seed", "--task", "e2e",
            "--max-new-tokens", "4"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.rstrip().endswith(
        "an E2E challenge CSV (mr, ref) is read with data.format e2e (lorakit eval --format e2e)")
    code, out, _ = run(capsys, *argv, "--format", "e2e")
    scores = json.loads(out)
    assert code == 0 and {"bleu", "nist"} <= set(scores) and 0 <= scores["bleu"] <= 1
