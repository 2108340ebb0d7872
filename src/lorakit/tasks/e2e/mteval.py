"""BLEU and NIST as the E2E NLG Challenge's Python MT-Eval computes them (mteval-v13a rules).

The rules, each of which moves a score on the challenge's test set:

* **Tokenisation** (mteval-v13a's basic, Western-language rules): SGML entities unescaped; the
  ASCII punctuation ``{|}~[\\]^_`` and ``!"#$%&()*+:;<=>?@/`` split off; a period or comma split
  off unless a digit stands on that side; a hyphen split off after a digit. Apostrophes and other
  hyphens stay inside words. Matching is case-insensitive (tokens are lowercased after splitting).
* **BLEU**: corpus-level, n = 1..4, clipped counts against the largest count of each n-gram in
  any one reference of the segment; the reference length is the reference closest in length to the
  output (the shorter on a tie); the brevity penalty applies when the outputs are not longer.
  Zero counts are floored (1e-15 hits, 1e-9 n-grams) so that the score is always defined.
* **NIST**: n = 1..5 with a variable number of references per segment. An n-gram's information
  is ``log2(count(its first n-1 words) / count(n-gram))`` counted over *every* reference of the
  corpus (the 0-gram count being the total reference length); a segment's hits are clipped as in
  BLEU; each order's information sum is divided by the outputs' n-gram count; the length penalty
  ``exp(-beta * log(ratio)^2)`` (beta puts 0.5 at ratio 1.5) compares the outputs' length with the
  sum over segments of the *mean* reference length.

Two quirks are kept because the challenge's figures contain them: an empty output counts as one
(empty) token, and an output shorter than n adds ``len - n + 1`` (a negative number) to the
n-gram count.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from lorakit.data.formats import DataError

BLEU_ORDER = 4
NIST_ORDER = 5

# (pattern, replacement), applied in order: first the language-independent clean-up ...
_CLEANUP = (
    (r"<skipped>", ""),
    (r"-\n", ""),
    (r"\n", " "),
    (r"&quot;", '"'),
    (r"&amp;", "&"),
    (r"&lt;", "<"),
    (r"&gt;", ">"),
)
_PUNCTUATION = re.escape("{|}~[\\]^_`" + ' !"#$%&' + "()*+" + ":;<=>?@" + "/")
# ... then the Western-language splitting. Each is one left-to-right re.sub pass; the passes do not
# overlap their own matches, which decides cases such as "a.,b" exactly as MT-Eval does.
_SPLIT = (
    (rf"([{_PUNCTUATION}])", r" \1 "),
    (r"([^0-9])([.,])", r"\1 \2 "),  # period/comma after a non-digit
    (r"([.,])([^0-9])", r" \1 \2"),  # period/comma before a non-digit
    (r"([0-9])(-)", r"\1 \2 "),  # hyphen after a digit
)
_RULES = tuple((re.compile(p), r) for p, r in _CLEANUP + _SPLIT)

_TINY_HITS = 1e-15
_SMALL_COUNT = 1e-9
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def tokenize(text: str) -> list[str]:
    """MT-Eval's tokens of ``text``, lowercased. ``""`` gives ``[""]`` (one empty token), as in MT-Eval."""
    for pattern, replacement in _RULES[: len(_CLEANUP)]:
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for pattern, replacement in _RULES[len(_CLEANUP) :]:
        text = pattern.sub(replacement, text)
    return re.sub(r"\s+", " ", text).strip().lower().split(" ")


def _tuples(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@dataclass
class CorpusStats:
    """What BLEU and NIST are computed from; index n is the n-gram order (1..NIST_ORDER)."""

    hits: list[list[Counter]]  # [n][segment]: each output n-gram's count, capped by its largest count in one reference
    counts: list[int]  # [n]: output n-grams, len - n + 1 per segment (negative for a short output, as MT-Eval)
    references: list[Counter]  # [n]: n-gram counts over every reference of the corpus; [0][()] = their total length
    closest_ref_length: int  # BLEU: per segment the reference closest in length (the shorter on a tie)
    mean_ref_length: float  # NIST: per segment the mean reference length

    @classmethod
    def of(cls, outputs: list[str], references: list[list[str]]) -> CorpusStats:
        """Tokenise and count once for both metrics.

        Raises:
            DataError: not one reference group per output, or a group without references.
        """
        if len(outputs) != len(references):
            raise DataError(f"E2E scoring: {len(outputs)} outputs for {len(references)} reference groups; expected one each")
        if any(not group for group in references):
            raise DataError("E2E scoring: every output needs at least one reference")
        stats = cls([[] for _ in range(NIST_ORDER + 1)], [0] * (NIST_ORDER + 1),
                    [Counter() for _ in range(NIST_ORDER + 1)], 0, 0.0)
        for output, group in zip(outputs, references):
            stats._add(tokenize(output), [tokenize(r) for r in group])
        return stats

    def _add(self, hyp: list[str], refs: list[list[str]]) -> None:
        for n in range(1, NIST_ORDER + 1):
            ref_tuples = [_tuples(r, n) for r in refs]
            ref_ngrams = [Counter(t) for t in ref_tuples]
            output = Counter(_tuples(hyp, n))
            clipped = ((g, min(k, max(r[g] for r in ref_ngrams))) for g, k in output.items())
            self.hits[n].append(Counter({g: k for g, k in clipped if k}))
            self.counts[n] += len(hyp) - n + 1
            for tuples in ref_tuples:
                self.references[n].update(tuples)  # an iterable: counted in C
        lengths = [len(r) for r in refs]
        self.references[0][()] += sum(lengths)
        self.closest_ref_length += min(lengths, key=lambda k: (abs(k - len(hyp)), k))
        self.mean_ref_length += sum(lengths) / len(lengths)

    def bleu(self, smoothing: float = 0.0) -> float:
        """BLEU; `smoothing` is added to every order's hits and counts (MT-Eval's sentBLEU adds 1), the counts of an
        output shorter than the order taken as 0 then (MT-Eval's below-zero counts would give 25 for 'x y')."""
        hits = [sum(segment.total() for segment in self.hits[n]) for n in range(1, BLEU_ORDER + 1)]
        counts = self.counts[1 : BLEU_ORDER + 1]
        if smoothing:
            counts = [max(c, 0) for c in counts]
        output_length = counts[0]
        if output_length > self.closest_ref_length:
            penalty = 1.0
        else:
            penalty = math.exp(1.0 - self.closest_ref_length / (output_length or 1e-5))
        log_precision = sum(math.log(max(h + smoothing, _TINY_HITS) / max(c + smoothing, _SMALL_COUNT))
                            for h, c in zip(hits, counts))
        return penalty * math.exp(log_precision / BLEU_ORDER)

    def nist(self) -> float:
        refs = self.references

        def information(ngram: tuple) -> float:
            return math.log2(refs[len(ngram) - 1][ngram[:-1]] / refs[len(ngram)][ngram])

        score = 0.0
        for n in range(1, NIST_ORDER + 1):
            gained = sum(information(g) * k for hits in self.hits[n] for g, k in hits.items())
            score += gained / self.counts[n] if self.counts[n] else 0.0  # no output n-grams: nothing gained
        return _nist_length_penalty(self.counts[1], self.mean_ref_length) * score


def bleu(outputs: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU on a 0-1 scale, as the challenge's MT-Eval (multi-reference, case-insensitive).

    Args:
        outputs: one system output per segment (meaning representation).
        references: every reference of each segment.
    """
    return CorpusStats.of(outputs, references).bleu()


def sentence_bleu(output: str, references: list[str]) -> float:
    """One output's BLEU (0-1) with add-one smoothing, as the challenge's per-segment sentBLEU
    (``BLEUScore(smoothing=1.0)`` in its MT-Eval) but for outputs shorter than 4 words, whose n-gram counts it
    takes as 0 rather than below 0 (which gave scores above 1): corpus BLEU of one short segment is near 0 even
    when it equals a reference, for want of 4-gram hits."""
    return CorpusStats.of([output], [references]).bleu(smoothing=1.0)


def nist(outputs: list[str], references: list[list[str]]) -> float:
    """Corpus NIST (n = 1..5), as the challenge's Python MT-Eval, with a variable number of references."""
    return CorpusStats.of(outputs, references).nist()


def bleu_and_nist(outputs: list[str], references: list[list[str]]) -> tuple[float, float]:
    """Both, from one pass over the corpus."""
    stats = CorpusStats.of(outputs, references)
    return stats.bleu(), stats.nist()


def _nist_length_penalty(output_length: int, mean_ref_length: float) -> float:
    ratio = output_length / mean_ref_length
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)
