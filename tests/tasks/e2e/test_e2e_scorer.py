"""The E2E challenge scorer reproduces two real challenge systems' official scores.

TGen (the challenge baseline) and Slug2Slug (the winner by BLEU), as submitted, scored against the
official test set; the official figures are those of the challenge's measure_scores.py (Python
MT-Eval, MS-COCO scorers), from ../shared/data/README.md. METEOR starts a Java process that loads
its paraphrase table (tens of seconds), so both systems are scored once per module, by one process.
"""

from pathlib import Path

import pytest

from lorakit.data.formats import DataError
from lorakit.infer.score import task_scorer
from lorakit.tasks.e2e import CocoScorers, coco_unavailable, mteval, score, score_challenge, score_files
from lorakit.tasks.e2e.coco import ptb_tokenize
from lorakit.tasks.e2e.files import read_outputs, read_references, references_for

E2E = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "e2e"
TEST_SET = E2E / "original" / "testset_w_refs.csv"
OFFICIAL = {  # system: (BLEU, NIST, METEOR, ROUGE-L, CIDEr)
    "tgen": (65.93, 8.5923, 44.83, 68.50, 2.2338),
    "slug": (66.19, 8.5824, 44.54, 67.72, 2.2615),
}
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
TOLERANCE = {"bleu": 0.05, "nist": 0.005, "meteor": 0.05, "rouge_l": 0.05, "cider": 0.005}
needs_java = pytest.mark.skipif(coco_unavailable() is not None, reason=str(coco_unavailable()))


def system(name: str) -> tuple[list[str], list[list[str]]]:
    outputs = read_outputs(E2E / "system_outputs" / f"{name}.tsv")
    return outputs.outputs, references_for(outputs, read_references(TEST_SET), str(TEST_SET))


@pytest.fixture(scope="module")
def coco():
    with CocoScorers() as scorers:
        yield scorers


@pytest.fixture(scope="module")
def official_scores(coco) -> dict[str, dict]:
    return {name: score_files(E2E / "system_outputs" / f"{name}.tsv", TEST_SET, coco) for name in OFFICIAL}


@pytest.mark.parametrize("name", OFFICIAL)
def test_mteval_bleu_and_nist_reproduce_the_official_scores(name):
    # No Java needed: the two MT-Eval scores to the official figures' last printed digit.
    bleu, nist = mteval.bleu_and_nist(*system(name))
    assert 100 * bleu == pytest.approx(OFFICIAL[name][0], abs=0.005)
    assert nist == pytest.approx(OFFICIAL[name][1], abs=0.00005)


@pytest.mark.slow
@needs_java
@pytest.mark.parametrize("name", OFFICIAL)
def test_all_five_scores_reproduce_the_official_rows(official_scores, name):
    scores = official_scores[name]
    assert (scores["mrs"], scores["references"], scores["reference_mrs"]) == (630, 4693, 630)
    got = {m: round(scores[m], 4) for m in METRICS}
    for metric, expected in zip(METRICS, OFFICIAL[name]):
        assert abs(scores[metric] - expected) <= TOLERANCE[metric], (metric, got, OFFICIAL[name])
    # The tolerance tells scorers apart: sacreBLEU's cased 13a BLEU misses the official BLEU by far more.
    assert abs(scores["bleu_sacrebleu"] - OFFICIAL[name][0]) > 0.5


@needs_java
def test_ptb_tokenisation_as_the_coco_scripts():
    texts = ["The Café costs £20-25, isn't it?", "", "two\nlines (here)", 'Fish & Chips "here".']
    # Lowercased, PTB's splits (n't, £ -> #), punctuation dropped; lowercased bracket tokens stay, as in COCO.
    assert ptb_tokenize(texts) == ["the café costs # 20-25 is n't it", "", "two lines -lrb- here -rrb-", "fish & chips here"]


@pytest.mark.slow
@needs_java
def test_coco_scores_of_exact_and_swapped_outputs(coco):
    refs = [["The Vaults is a cheap pub.", "A cheap pub: The Vaults."], ["Blue Spice is a coffee shop."],
            ["Zizzi is a family friendly restaurant near Avalon."]]
    exact = ["A cheap pub: The Vaults.", "Blue Spice is a coffee shop.", "Zizzi is a family friendly restaurant near Avalon."]
    perfect = coco.score(exact, refs)
    assert perfect["rouge_l"] == pytest.approx(100) and perfect["meteor"] > 95 and perfect["cider"] > 5
    swapped = coco.score([exact[1], exact[2], exact[0]], refs)
    assert swapped["rouge_l"] < 50 and swapped["meteor"] < 50 and swapped["cider"] < 0.5


def test_without_java_the_coco_metrics_are_reported_missing(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no `java` to be found
    scores = score_challenge(["A cheap pub: The Vaults."], [["A cheap pub: The Vaults."]])
    assert scores["bleu"] == pytest.approx(100) and scores["bleu_sacrebleu"] == pytest.approx(100)
    assert scores["meteor"] is None and scores["rouge_l"] is None and scores["cider"] is None
    assert "java" in scores["notes"]["meteor"].lower()


def test_training_time_scorer_is_the_challenge_bleu_and_nist():
    scorer = task_scorer("e2e")
    assert getattr(scorer, "multi_reference", False)
    outputs, references = system("tgen")
    scores = scorer(outputs[:60], references[:60])
    bleu, nist = mteval.bleu_and_nist(outputs[:60], references[:60])
    assert scores == {"bleu": bleu, "nist": nist} and 0.5 < bleu < 0.9  # BLEU a fraction, like every task score
    assert score(["Blue Spice is a pub."], ["blue spice is a pub ."])["bleu"] == pytest.approx(1.0)  # one reference
    with pytest.raises(DataError, match="1 outputs for 2 meaning representations"):
        score(["a"], [["a"], ["b"]])
