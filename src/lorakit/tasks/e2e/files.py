"""The E2E challenge's files: a system's outputs (TSV, ``MR<TAB>output``) and the references (CSV, ``mr,ref``).

As the challenge's ``measure_scores.py`` reads them: a BOM and surrounding whitespace are dropped,
blank lines skipped, and four mis-encodings of ``£`` and ``é`` repaired in outputs and references
alike; the references of an MR are every reference row with that MR, whatever their order, and the
outputs are scored in the system file's order.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.e2e import read_e2e_csv
from lorakit.data.formats import DataError

# What measure_scores.py repairs in every line it reads (outputs and references alike).
MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))

_MR_HEADER = re.compile(r"(mr|src|source|meaning[ _.-]?representation)s?", re.IGNORECASE)
_OUTPUT_HEADER = re.compile(r"(out(put)?|sys(tem)?([ _.-]?out(put)?)?|pred(iction)?|hyp(othesis)?)s?", re.IGNORECASE)

OFFICIAL_TEST_SET = Path("e2e") / "original" / "testset_w_refs.csv"
"""The release's test set with references, under the shared data folder (``../shared/data``)."""


def repair(text: str) -> str:
    """``text`` stripped and with the challenge script's encoding repairs applied."""
    for broken, fixed in MOJIBAKE:
        text = text.replace(broken, fixed)
    return text.strip()


@dataclass
class Outputs:
    """A system's outputs, one per MR, in file order."""

    path: str
    mrs: list[str]
    outputs: list[str]
    lines: list[int]  # the line each output is on, for messages

    def __len__(self) -> int:
        return len(self.outputs)


def read_outputs(path: str | Path) -> Outputs:
    """A challenge-style system output file: header ``MR<TAB>output``, then one MR and its output a line.

    Raises:
        FileNotFoundError: no such file.
        DataError: no recognisable header, a line without exactly two tab-separated fields, or an
            MR given twice; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E2E system outputs not found: {path}")
    text = _decode(path)
    result = Outputs(str(path), [], [], [])
    seen: dict[str, int] = {}
    header_seen = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = _tab_fields(line, path, number)
        if not header_seen:
            if len(fields) != 2 or not _MR_HEADER.fullmatch(fields[0].strip()) or not _OUTPUT_HEADER.fullmatch(fields[1].strip()):
                raise DataError(f"{path}:{number}: expected the header MR<TAB>output, got {line.strip()[:80]!r}")
            header_seen = True
            continue
        if len(fields) != 2:
            raise DataError(f"{path}:{number}: expected 2 tab-separated fields (MR, output), got {len(fields)}")
        mr, output = repair(fields[0]), repair(fields[1])
        if mr in seen:
            raise DataError(f"{path}:{number}: MR already given on line {seen[mr]}; expected one output per MR")
        seen[mr] = number
        result.mrs.append(mr)
        result.outputs.append(output)
        result.lines.append(number)
    if not header_seen:
        raise DataError(f"{path}:1: empty file; expected the header MR<TAB>output and one line per MR")
    if not result.outputs:
        raise DataError(f"{path}:2: no outputs after the header; expected one MR<TAB>output line per MR")
    return result


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None


def _tab_fields(line: str, path: Path, number: int) -> list[str]:
    try:
        return next(csv.reader([line], delimiter="\t", strict=True))
    except csv.Error as err:
        raise DataError(f"{path}:{number}: malformed TSV line ({err})") from None


def read_references(path: str | Path) -> dict[str, list[str]]:
    """Every reference of each MR of an E2E release CSV (header ``mr,ref``), MRs in order of first row.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a ``mr,ref`` CSV; the message names the file and line.
    """
    try:
        rows = read_e2e_csv(path)
    except UnicodeDecodeError:
        _decode(Path(path))  # raises the one-line error naming the line
        raise
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(repair(row["mr"]), []).append(repair(row["ref"]))
    if not grouped:
        raise DataError(f"{path}:2: no references after the header; expected mr,ref rows")
    return grouped


def references_for(outputs: Outputs, references: dict[str, list[str]], source: str) -> list[list[str]]:
    """The references of each output's MR, in the outputs' order.

    Raises:
        DataError: an MR of the outputs has no reference; names the outputs' file and line.
    """
    grouped = []
    for mr, line in zip(outputs.mrs, outputs.lines):
        if mr not in references:
            raise DataError(f"{outputs.path}:{line}: MR {mr[:80]!r} has no reference in {source}; "
                            "expected the MRs of the reference file")
        grouped.append(references[mr])
    return grouped


def default_references() -> Path:
    """The official test set with references: ``../shared/data/e2e/original/testset_w_refs.csv`` beside
    the working directory, or beside the source checkout lorakit runs from.

    Raises:
        DataError: found in neither place (pass ``--references``).
    """
    checkout = Path(__file__).resolve().parents[4]  # src/lorakit/tasks/e2e/files.py -> the checkout
    places = [Path.cwd().parent / "shared" / "data", checkout.parent / "shared" / "data"]
    candidates = list(dict.fromkeys(place / OFFICIAL_TEST_SET for place in places))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(c) for c in candidates)
    raise DataError(f"the official E2E test references were not found at {looked}; "
                    "pass --references with the release's testset_w_refs.csv")
