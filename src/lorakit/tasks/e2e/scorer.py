"""The E2E challenge's five scores of a system, and the quick scorer for ``eval.task: e2e`` during training."""

from __future__ import annotations

import logging
from pathlib import Path

from lorakit.data.formats import DataError
from lorakit.tasks.e2e import mteval
from lorakit.tasks.e2e.coco import CocoScorers, coco_unavailable
from lorakit.tasks.e2e.files import default_references, read_outputs, read_references, references_for

log = logging.getLogger(__name__)

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
LABELS = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
SCORER = ("E2E NLG Challenge scorer (measure_scores.py rules): BLEU and NIST as its Python MT-Eval, "
          "METEOR, ROUGE-L and CIDEr as its MS-COCO scorers after PTB tokenisation")
SACREBLEU_LABEL = "sacreBLEU (13a tokenisation, cased; not a challenge metric)"


def _check(outputs: list[str], references: list[list[str]]) -> None:
    if len(outputs) != len(references):
        raise DataError(f"E2E scoring: {len(outputs)} outputs for {len(references)} meaning representations; "
                        "expected one each")
    empty = [i for i, group in enumerate(references) if not group]
    if empty:
        raise DataError(f"E2E scoring: meaning representation {empty[0]} has no reference; expected at least one")


def sacrebleu_bleu(outputs: list[str], references: list[list[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100; 13a, cased, every reference of each MR): a second opinion only."""
    import sacrebleu

    width = max(len(group) for group in references)
    streams = [[group[k] if k < len(group) else None for group in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(outputs, streams).score)


def score_challenge(outputs: list[str], references: list[list[str]], coco: CocoScorers | None = None) -> dict:
    """The E2E challenge's scores of one output per meaning representation against all of its references.

    Args:
        outputs: one system output per MR.
        references: every reference of each MR.
        coco: a :class:`CocoScorers` to reuse (its METEOR process); one is made and closed otherwise.

    Returns:
        ``bleu``, ``meteor``, ``rouge_l`` (0-100), ``nist``, ``cider``, ``bleu_sacrebleu`` (0-100,
        see :data:`SACREBLEU_LABEL`), ``mrs``, ``references``, and ``notes``: why a metric is None
        (METEOR, ROUGE-L and CIDEr need pycocoevalcap and Java).
    """
    _check(outputs, references)
    bleu, nist = mteval.bleu_and_nist(outputs, references)
    scores: dict = {
        "bleu": 100 * bleu,
        "nist": nist,
        "meteor": None, "rouge_l": None, "cider": None,
        "bleu_sacrebleu": sacrebleu_bleu(outputs, references),
        "mrs": len(outputs), "references": sum(map(len, references)), "notes": {},
    }
    reason = coco_unavailable()
    if reason:
        scores["notes"] = {m: reason for m in ("meteor", "rouge_l", "cider")}
        log.warning("METEOR, ROUGE-L and CIDEr not computed: %s", reason)
    elif coco is not None:
        scores.update(coco.score(outputs, references))
    else:
        with CocoScorers() as own:
            scores.update(own.score(outputs, references))
    return scores


def score_files(predictions: str | Path, references: str | Path | None = None, coco: CocoScorers | None = None,
                allow_subset: bool = False) -> dict:
    """Score a challenge-style output file (``MR<TAB>output``) against a reference CSV (``mr,ref``).

    Args:
        predictions: the system's outputs, one line per MR after the header.
        references: the references; the official test set (:func:`default_references`) when None.
        coco: a :class:`CocoScorers` to reuse.
        allow_subset: score outputs for only some of the reference file's MRs (else that is an error: a cut
            output file, scored as it stands, would read as a whole system's scores).

    Returns:
        :func:`score_challenge`'s dict plus ``predictions``, ``references_file`` and
        ``reference_mrs`` (how many MRs the reference file has; ``mrs`` of them were scored).

    Raises:
        FileNotFoundError: a file is missing.
        DataError: a malformed file, an MR without references (the message names file and line), or outputs for
            only some of the MRs without `allow_subset`.
    """
    references = Path(references) if references is not None else default_references()
    outputs = read_outputs(predictions)
    by_mr = read_references(references)
    grouped = references_for(outputs, by_mr, str(references))
    given = set(outputs.mrs)
    missing = [mr for mr in by_mr if mr not in given]
    if missing and not allow_subset:
        raise DataError(f"{predictions}: outputs for {len(by_mr) - len(missing)} of the {len(by_mr)} MRs of "
                        f"{references} (the first without one: {missing[0][:80]!r}); expected one output per MR, or "
                        "--allow-subset to score the given ones only")
    scores = score_challenge(outputs.outputs, grouped, coco)
    return {**scores, "predictions": str(predictions), "references_file": str(references), "reference_mrs": len(by_mr)}


def score(preds: list[str], refs: list[list[str]] | list[str]) -> dict[str, float]:
    """The task scorer for ``eval.task: e2e``: the challenge's BLEU (as a fraction) and NIST, per MR.

    Pure Python, quick enough to run during training. ``refs`` holds every reference of each prompt
    (score_generations groups them); a plain string counts as one reference.
    """
    grouped = [[r] if isinstance(r, str) else list(r) for r in refs]
    _check(preds, grouped)
    bleu, nist = mteval.bleu_and_nist(preds, grouped)
    return {"bleu": bleu, "nist": nist}


def row_score(prediction: str, references: list[str] | str) -> dict[str, float]:
    """One output's verdict (samples.jsonl, the dashboard): the challenge's per-segment sentBLEU (smoothed) as a
    fraction; corpus BLEU and NIST mean little on one segment."""
    grouped = [references] if isinstance(references, str) else list(references)
    return {"bleu": mteval.sentence_bleu(prediction, grouped)}


score.multi_reference = True  # score_generations generates each distinct prompt once and passes all its references
score.row = row_score  # the verdict on one output alone
