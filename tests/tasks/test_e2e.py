"""E2E metrics on hand-checkable examples: exact matches, one-word changes, multi-reference rules."""

import math
import shutil

import pytest

from lorakit.data.formats import DataError
from lorakit.infer.score import task_scorer
from lorakit.tasks.e2e import bleu, coco_unavailable, meteor_and_cider, nist, rouge_l, score, score_e2e

REFS = [
    ["The Vaults is a cheap pub near Café Adriatic.", "Near Café Adriatic there is a cheap pub called The Vaults."],
    ["Blue Spice is a coffee shop in the city centre."],
]
EXACT = ["Near Café Adriatic there is a cheap pub called The Vaults.", "Blue Spice is a coffee shop in the city centre."]
TOKENISED = [
    ["The Vaults is a cheap pub near Café Adriatic .", "Near Café Adriatic there is a cheap pub called The Vaults ."],
    ["Blue Spice is a coffee shop in the city centre ."],
]


def test_exact_match_of_any_reference_scores_100():
    assert bleu(EXACT, REFS) == pytest.approx(100)
    assert rouge_l(EXACT, REFS) == pytest.approx(100)
    # loralib's references are tokenised; the MT-Eval way (13a, case-insensitive) still matches exactly.
    assert bleu([p.upper() for p in EXACT], TOKENISED, lowercase=True) == pytest.approx(100)
    assert bleu([p.upper() for p in EXACT], TOKENISED) < 10  # while cased BLEU sees every word differ


def test_a_changed_word_costs_what_the_formulas_say():
    preds = ["the pub is cheap"]
    # ROUGE-L: LCS 3 of 4 words either way -> P = R = F = 0.75; the better of two references counts.
    assert rouge_l(preds, [["the pub was cheap"]]) == pytest.approx(75)
    assert rouge_l(preds, [["nothing alike", "the pub was cheap"]]) == pytest.approx(75)
    # BLEU: no 4-gram in common with the only reference -> 0; one exact reference among several -> 100.
    assert bleu(preds, [["the pub was cheap"]]) == pytest.approx(0)
    assert bleu(preds, [["the pub was cheap", "the pub is cheap"]]) == pytest.approx(100)


def test_nist_of_an_exact_match_is_the_unigram_information():
    # Five distinct reference words: each unigram carries log2(5/1) bits, every longer n-gram 0 bits.
    assert nist(["A b c d e"], [["a b c d e"]]) == pytest.approx(math.log2(5))
    assert nist(["a b"], [["a b"]]) == pytest.approx(1.0)  # orders with no n-gram add nothing
    assert nist([""], [["a b"]]) == 0.0


def test_mismatched_lengths_are_one_line_errors():
    with pytest.raises(DataError, match="1 outputs for 2 meaning representations"):
        bleu(EXACT[:1], REFS)
    with pytest.raises(DataError, match="has no reference"):
        rouge_l(EXACT, [REFS[0], []])


def test_task_scorer_takes_grouped_references_and_reports_fractions():
    scorer = task_scorer("e2e")
    assert getattr(scorer, "multi_reference", False)
    scores = scorer(EXACT, REFS)
    assert scores == pytest.approx({"bleu": 1.0, "rouge_l": 1.0})
    assert score(["Blue Spice is a coffee shop in the city centre."], ["Blue Spice is a coffee shop in the city centre."])["bleu"] == pytest.approx(1.0)


def test_without_java_meteor_and_cider_are_reported_missing(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no `java` to be found
    assert coco_unavailable() is not None
    scores = score_e2e(EXACT, REFS, TOKENISED)
    assert scores["bleu"] == pytest.approx(100) and scores["bleu_tokenised"] == pytest.approx(100)
    assert scores["meteor"] is None and scores["cider"] is None
    assert "java" in scores["notes"]["meteor"].lower() or "pycocoevalcap" in scores["notes"]["meteor"]
    assert scores["mrs"] == 2 and scores["references"] == 3


@pytest.mark.slow
@pytest.mark.skipif(coco_unavailable() is not None, reason=str(coco_unavailable()))
def test_meteor_and_cider_from_pycocoevalcap():
    # One call (METEOR loads its paraphrase table each time, ~20 s here): the outputs swapped score low.
    preds = EXACT + [EXACT[1], EXACT[0]]
    scores = meteor_and_cider(preds, REFS + REFS)
    assert 25 < scores["meteor"] < 75 and 50 < scores["rouge_l_coco"] < 75 and scores["cider"] > 0


def test_java_lookup_is_real():
    # The skip above is only honest if coco_unavailable looks for the real binary.
    assert (coco_unavailable() is None) <= (shutil.which("java") is not None)
