"""METEOR, ROUGE-L and CIDEr as the E2E challenge computes them: the MS-COCO caption scorers
(pycocoevalcap: METEOR 1.5 with its paraphrase table, ROUGE-L with beta 1.2, CIDEr-D) after the
Stanford PTB tokeniser (lowercased, punctuation dropped).

pycocoevalcap is the optional ``e2e`` extra (``pip install 'lorakit[e2e]'``); METEOR and the PTB
tokeniser run on Java. METEOR loads its paraphrase table once per process (tens of seconds), so a
:class:`CocoScorers` keeps one METEOR process for every corpus it scores.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


def coco_unavailable() -> str | None:
    """Why METEOR/ROUGE-L/CIDEr cannot be computed here, or None when they can."""
    try:
        import pycocoevalcap  # noqa: F401  (optional: the 'e2e' extra)
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'lorakit[e2e]')"
    if shutil.which("java") is None:
        return "METEOR and the PTB tokeniser need Java, and no `java` is on PATH"
    return None


# Tokens the MS-COCO scripts drop after PTB tokenisation (PTB's spellings of quotes and brackets included).
PTB_PUNCTUATION = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Each text as the MS-COCO scripts prepare it: Stanford CoreNLP 3.4.1's PTB tokeniser (the jar
    pycocoevalcap ships), lowercased, one line per text, :data:`PTB_PUNCTUATION` dropped, tokens
    joined by single spaces.

    Raises:
        RuntimeError: Java or pycocoevalcap is missing, or the tokeniser failed.
    """
    reason = coco_unavailable()
    if reason:
        raise RuntimeError(reason)
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    # One text a line: a line break inside a text would shift every later one; whitespace is no token anyway.
    lines = [" ".join(text.split()) for text in texts]
    with tempfile.TemporaryDirectory(prefix="lorakit-ptb-") as folder:
        source = Path(folder) / "texts.txt"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        command = ["java", "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", str(source)]
        done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"the PTB tokeniser failed (exit {done.returncode}): {message[-1] if message else ''}")
    tokenized = done.stdout.decode("utf-8").split("\n")
    if len(tokenized) < len(lines):
        raise RuntimeError(f"the PTB tokeniser returned {len(tokenized)} lines for {len(lines)} texts")
    return [" ".join(t for t in line.rstrip().split(" ") if t not in PTB_PUNCTUATION) for line in tokenized[: len(lines)]]


class CocoScorers:
    """The challenge's three MS-COCO metrics, one METEOR process shared by every call to :meth:`score`.

    Use as a context manager (or call :meth:`close`) so the METEOR process ends with it.

    Raises:
        RuntimeError: pycocoevalcap or Java is missing (see :func:`coco_unavailable`).
    """

    def __init__(self) -> None:
        reason = coco_unavailable()
        if reason:
            raise RuntimeError(reason)
        self._meteor = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the METEOR process (idempotent)."""
        meteor, self._meteor = self._meteor, None
        if meteor is not None:
            with meteor.lock:
                meteor.meteor_p.stdin.close()
                meteor.meteor_p.kill()
                meteor.meteor_p.wait()

    def tokenize(self, outputs: list[str], references: list[list[str]]) -> tuple[dict, dict]:
        """PTB-tokenised ``(references, outputs)`` keyed by segment, as the scorers take them (one Java run)."""
        texts = [r for group in references for r in group] + list(outputs)
        tokens = iter(ptb_tokenize(texts))
        gts = {i: [next(tokens) for _ in group] for i, group in enumerate(references)}
        return gts, {i: [next(tokens)] for i in range(len(outputs))}

    def score(self, outputs: list[str], references: list[list[str]]) -> dict[str, float]:
        """``meteor`` and ``rouge_l`` (0-100) and ``cider`` of one output per segment against its references."""
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = self.tokenize(outputs, references)
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            log.info("starting METEOR 1.5 (Java; loads its paraphrase table)")
            self._meteor = Meteor()
        meteor, _ = self._meteor.compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        return {"meteor": 100 * float(meteor), "rouge_l": 100 * float(rouge), "cider": float(cider)}
