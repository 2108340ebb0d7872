"""The E2E NLG Challenge's scores (BLEU, NIST, METEOR, ROUGE-L, CIDEr), computed by its own rules.

The challenge (and every published E2E result, the LoRA paper's included) scores with
tuetschek/e2e-metrics' ``measure_scores.py``; this package follows it:

* :mod:`.mteval`: BLEU and NIST as its Python MT-Eval (case-insensitive, MT-Eval tokenisation, NIST
  with a variable number of references per MR).
* :mod:`.coco`: METEOR 1.5, ROUGE-L and CIDEr-D from the MS-COCO scorers (pycocoevalcap) after PTB
  tokenisation; they need Java and the ``e2e`` extra, and are reported as None with the reason otherwise.
* :mod:`.files`: the challenge's files (``MR<TAB>output`` outputs, ``mr,ref`` references grouped by MR).
* :mod:`.scorer`: :func:`score_challenge` and :func:`score_files`, and :func:`score`, the quick
  (BLEU, NIST) scorer that ``eval.task: e2e`` runs during training.

In :func:`score_challenge` BLEU, METEOR and ROUGE-L are on a 0-100 scale (as the papers' tables), NIST and CIDEr
as they come; the training-time :func:`score` gives BLEU as a fraction, like every task score.
``tests/tasks/e2e`` reproduces two challenge systems' official scores.
"""

from lorakit.tasks.e2e.coco import CocoScorers, coco_unavailable
from lorakit.tasks.e2e.files import default_references, read_outputs, read_references
from lorakit.tasks.e2e.scorer import (
    LABELS,
    METRICS,
    SACREBLEU_LABEL,
    SCORER,
    sacrebleu_bleu,
    score,
    score_challenge,
    score_files,
)

__all__ = [
    "LABELS", "METRICS", "SACREBLEU_LABEL", "SCORER", "CocoScorers", "coco_unavailable", "default_references",
    "read_outputs", "read_references", "sacrebleu_bleu", "score", "score_challenge", "score_files",
]
