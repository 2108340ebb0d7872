"""E2E NLG scores as the LoRA paper reports them: BLEU, NIST, METEOR, ROUGE-L, CIDEr, multi-reference.

Every metric comes from an established package; nothing here counts n-grams itself.

* BLEU: sacrebleu's corpus BLEU with every reference of an MR. ``bleu`` is against the official
  references with sacrebleu's own (13a, cased) tokenisation. ``bleu_tokenised`` is against loralib's
  tokenised references, scored as the E2E challenge's Python MT-Eval (which loralib's
  ``measure_scores.py -p`` runs) does: 13a tokenisation, case-insensitive.
* NIST: ``nltk.translate.nist_score.corpus_nist`` (n=5) on the same lowercased 13a tokens.
* ROUGE-L: rouge-score's ``rougeL`` F-measure, the best reference per MR, averaged over MRs.
* METEOR and CIDEr: pycocoevalcap, the MS-COCO caption scorers the E2E challenge scripts use
  (METEOR 1.5 with its paraphrase table; CIDEr-D), after the same PTB tokenisation. Both need Java
  and the optional ``pycocoevalcap`` package (``pip install 'lorakit[e2e]'``); without them they are
  reported as None with the reason under ``notes``. nltk's own METEOR is not used: it needs the
  WordNet corpus, which nltk downloads at run time and this machine cannot fetch.

BLEU, METEOR and ROUGE-L are on a 0-100 scale, as in the paper's table; NIST and CIDEr as they come.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil

from lorakit.data.formats import DataError

log = logging.getLogger(__name__)

PAPER_ROWS = [
    # Hu et al. 2021 (LoRA), Table 3: GPT-2 on the E2E NLG Challenge test set, beam search.
    {"method": "GPT-2 M (FT), paper", "trainable": "354.92M", "bleu": 68.2, "nist": 8.62, "meteor": 46.2, "rouge_l": 71.0, "cider": 2.47},
    {"method": "GPT-2 M (LoRA), paper", "trainable": "0.35M", "bleu": 70.4, "nist": 8.85, "meteor": 46.8, "rouge_l": 71.8, "cider": 2.53},
    {"method": "GPT-2 L (LoRA), paper", "trainable": "0.77M", "bleu": 70.4, "nist": 8.89, "meteor": 46.8, "rouge_l": 72.0, "cider": 2.47},
]
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def _check(preds: list[str], refs: list[list[str]]) -> None:
    if len(preds) != len(refs):
        raise DataError(f"E2E scoring: {len(preds)} outputs for {len(refs)} meaning representations; expected one each")
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise DataError(f"E2E scoring: meaning representation {empty[0]} has no reference; expected at least one")


def _by_position(refs: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants reference streams (k-th reference of every MR), padded with None where an MR has fewer."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(preds: list[str], refs: list[list[str]], *, lowercase: bool = False) -> float:
    """Corpus BLEU (0-100) with every reference of each MR, sacrebleu's 13a tokenisation, no smoothing."""
    import sacrebleu

    _check(preds, refs)
    # No smoothing, as MT-Eval: on a whole test set every n-gram order has matches, so it changes nothing there.
    result = sacrebleu.corpus_bleu(preds, _by_position(refs), lowercase=lowercase, tokenize="13a", smooth_method="none")
    return float(result.score)


def _mteval_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


def nist(preds: list[str], refs: list[list[str]], n: int = 5) -> float:
    """Corpus NIST (nltk) on lowercased 13a tokens, as MT-Eval scores it."""
    from nltk.translate.nist_score import corpus_nist

    _check(preds, refs)
    hyps = [_mteval_tokens(p) for p in preds]
    tokenised_refs = [[_mteval_tokens(r) for r in group] for group in refs]
    # nltk divides by the hypotheses' count of each order; MT-Eval's orders with no n-gram add 0.
    n = min(n, max(map(len, hyps), default=0))
    return float(corpus_nist(tokenised_refs, hyps, n=n)) if n > 0 else 0.0


def rouge_l(preds: list[str], refs: list[list[str]]) -> float:
    """ROUGE-L F-measure (0-100): the best reference per MR (rouge-score's score_multi), averaged."""
    from rouge_score import rouge_scorer

    _check(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return 100 * sum(scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)


def coco_unavailable() -> str | None:
    """Why METEOR/CIDEr cannot be computed here, or None when they can."""
    try:
        import pycocoevalcap  # noqa: F401  (optional: the 'e2e' extra)
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'lorakit[e2e]')"
    if shutil.which("java") is None:
        return "pycocoevalcap's METEOR and PTB tokenizer need Java, and no `java` is on PATH"
    return None


def meteor_and_cider(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """METEOR (0-100) and CIDEr-D from pycocoevalcap after its PTB tokenisation (as the E2E scripts).

    Raises:
        RuntimeError: pycocoevalcap or Java is missing (see :func:`coco_unavailable`).
    """
    reason = coco_unavailable()
    if reason:
        raise RuntimeError(reason)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check(preds, refs)
    tokenizer = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # the tokenizer prints a progress line
        gts = tokenizer.tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(refs)})
        res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        meteor.close() if hasattr(meteor, "close") else None
    cider_score, _ = Cider().compute_score(gts, res)
    rouge_coco, _ = Rouge().compute_score(gts, res)
    return {"meteor": 100 * float(meteor_score), "cider": float(cider_score), "rouge_l_coco": 100 * float(rouge_coco)}


def score_e2e(preds: list[str], refs: list[list[str]], tokenised_refs: list[list[str]] | None = None) -> dict:
    """Every E2E metric for one output per MR.

    Args:
        preds: one generated sentence per MR.
        refs: the official references of each MR.
        tokenised_refs: loralib's tokenised references of each MR, for ``bleu_tokenised``.

    Returns:
        ``bleu``, ``bleu_tokenised`` (None without tokenised_refs), ``nist``, ``meteor``,
        ``rouge_l``, ``cider``, ``rouge_l_coco``, ``mrs``, ``references`` and ``notes`` (why a
        metric is None).
    """
    scores: dict = {"mrs": len(preds), "references": sum(map(len, refs)), "notes": {}}
    scores["bleu"] = bleu(preds, refs)
    scores["bleu_tokenised"] = bleu(preds, tokenised_refs, lowercase=True) if tokenised_refs else None
    scores["nist"] = nist(preds, refs)
    scores["rouge_l"] = rouge_l(preds, refs)
    reason = coco_unavailable()
    if reason:
        scores.update(meteor=None, cider=None, rouge_l_coco=None)
        scores["notes"].update(meteor=reason, cider=reason)
        log.warning("METEOR and CIDEr not computed: %s", reason)
    else:
        scores.update(meteor_and_cider(preds, refs))
    return scores


def score(preds: list[str], refs: list[list[str]] | list[str]) -> dict[str, float]:
    """The task scorer for ``eval.task: e2e``: BLEU and ROUGE-L (the quick ones) per MR, as fractions.

    ``refs`` holds every reference of each prompt (score_generations groups them); a plain string
    counts as one reference. Fractions (0.653 for BLEU 65.3) like every task score in a run's log.
    """
    grouped = [[r] if isinstance(r, str) else list(r) for r in refs]
    return {"bleu": bleu(preds, grouped) / 100, "rouge_l": rouge_l(preds, grouped) / 100}


score.multi_reference = True  # score_generations generates each distinct prompt once and passes all its references
