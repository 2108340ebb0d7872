"""MT-Eval BLEU and NIST on hand-checkable cases: tokenisation, clipping, closest reference, NIST information."""

import math

import pytest

from lorakit.data.formats import DataError
from lorakit.tasks.e2e.mteval import bleu, nist, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        # Periods and commas split unless a digit stands on that side; a hyphen after a digit splits.
        ("The Vaults' price is £20-25, near Café Adriatic.",
         ["the", "vaults'", "price", "is", "£20", "-", "25", ",", "near", "café", "adriatic", "."]),
        ("It costs 1.5 or 1,000 pounds.", ["it", "costs", "1.5", "or", "1,000", "pounds", "."]),
        ("family-friendly (5/5)!", ["family-friendly", "(", "5", "/", "5", ")", "!"]),
        ("Fish &amp; chips &quot;here&quot;", ["fish", "&", "chips", '"', "here", '"']),
        ("two\nlines, hyph-\nenated", ["two", "lines", ",", "hyphenated"]),
        ("", [""]),  # MT-Eval's empty output is one empty token
    ],
)
def test_tokenize_follows_mteval_rules(text, tokens):
    assert tokenize(text) == tokens


def test_bleu_exact_match_case_insensitive_and_clipped():
    assert bleu(["The Pub is CHEAP near it."], [["the pub is cheap near it ."]]) == pytest.approx(1.0)
    # "the the the the" against "the pub is cheap": unigram hits clipped to 1 of 4; no bigram hit.
    # Higher orders have no hit: MT-Eval floors the hits at 1e-15; equal lengths, so no brevity penalty.
    precisions = [1 / 4, 1e-15 / 3, 1e-15 / 2, 1e-15 / 1]
    assert bleu(["the the the the"], [["the pub is cheap"]]) == pytest.approx(math.exp(sum(map(math.log, precisions)) / 4))


def test_bleu_brevity_penalty_uses_the_closest_reference_shorter_on_a_tie():
    # Length 5 output, references of 6 and 4 words: tie, the shorter (4) counts -> no penalty.
    assert bleu(["a b c d e"], [["a b c d e f", "a b c d"]]) == pytest.approx(1.0)
    # Only the 8-word reference: every precision 1, penalty exp(1 - 8/5).
    assert bleu(["a b c d e"], [["a b c d e f g h"]]) == pytest.approx(math.exp(1 - 8 / 5))


def test_bleu_takes_each_ngram_count_from_the_best_single_reference():
    # "a a b b": "a" twice in ref 1, "b" twice in ref 2 -> all four unigrams hit; bigrams "a a" and
    # "b b" hit, "a b" does not (2 of 3); no trigram or 4-gram hits (the floor).
    refs = [["a a c", "b b c"]]
    hits = [4 / 4, 2 / 3, 1e-15 / 2, 1e-15 / 1]
    expected = math.exp(sum(map(math.log, hits)) / 4)  # output (4) longer than the closest reference (3)
    assert bleu(["a a b b"], refs) == pytest.approx(expected)


def test_nist_information_over_every_reference_of_the_corpus():
    # One reference equal to the output: each unigram carries log2(5/1) bits, longer n-grams 0 bits.
    assert nist(["A b c d e"], [["a b c d e"]]) == pytest.approx(math.log2(5))
    # Two references "a b" and "a c": counts a=2, b=1, c=1 of 4 words; "a b" once of a=2.
    # Unigrams: (log2(4/2) + log2(4/1)) / 2 words = 1.5; bigram: log2(2/1) / 1 = 1; penalty 1 (2 words vs mean 2).
    assert nist(["a b"], [["a b", "a c"]]) == pytest.approx(2.5)


def test_nist_length_penalty_is_one_half_at_two_thirds_of_the_mean_reference_length():
    # 2 output words for a 3-word reference: unigram information log2(3) each, bigram 0 bits.
    assert nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))
    # The mean reference length counts, not the closest: references of 1 and 5 words -> mean 3.
    two = nist(["a b"], [["a", "a b c d e"]])
    # Reference counts: a=2, b=1 of 6 words; "a b" once of a=2.
    info = (math.log2(6 / 2) + math.log2(6 / 1)) / 2 + math.log2(2 / 1) / 1
    assert two == pytest.approx(0.5 * info)


def test_every_output_needs_references():
    with pytest.raises(DataError, match="1 outputs for 2"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(DataError, match="at least one reference"):
        nist(["a"], [[]])


def test_sentence_bleu_is_the_challenges_add_one_sentbleu():
    from lorakit.tasks.e2e.mteval import sentence_bleu

    # no hit at any order: (0+1)/(5+1), 1/(4+1), 1/(3+1), 1/(2+1); as long as the reference, no brevity penalty
    assert sentence_bleu("x y z w v", ["a pub near it ."]) == pytest.approx((1 / 6 * 1 / 5 * 1 / 4 * 1 / 3) ** 0.25)
    assert sentence_bleu("A pub.", ["a pub ."]) == pytest.approx(1.0)  # corpus BLEU of it alone: near 0
    assert bleu(["A pub."], [["a pub ."]]) < 0.05
    # shorter than 4 words: counts of 0, not below 0 (which gave 25.35 here)
    assert sentence_bleu("x y", ["a pub near it ."]) == pytest.approx(
        math.exp(1 - 5 / 2) * (1 / 3 * 1 / 2 * 1 * 1) ** 0.25)


def test_a_sample_rows_e2e_verdict_is_its_sentence_bleu():
    from lorakit.infer.score import row_scores
    from lorakit.tasks.e2e import score

    verdict = row_scores(score, "Blue Spice is a pub.", ["blue spice is a pub .", "A pub."])
    assert verdict == {"bleu": pytest.approx(1.0)}
