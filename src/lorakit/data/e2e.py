"""The E2E NLG Challenge data (restaurant meaning representation -> one sentence) as lorakit records.

Two on-disk forms are read:

* the official release's CSVs (header ``mr,ref``; train comes in parts, read them together with a
  glob such as ``trainset.part*of3.csv``). Fields may hold quoted commas and line breaks, so they
  go through the ``csv`` module, never line by line.
* loralib's ``lora_format`` text files: one pair a line,
  ``name : Blue Spice | Type : coffee shop||A coffee shop called Blue Spice . `` with a
  tokenised reference; line i is row i of the matching official CSV.

A meaning representation (MR) such as ``name[The Vaults], eatType[pub], familyFriendly[no]`` is
rendered compactly and deterministically (attributes in the release's canonical order, readable
names) as ``name: The Vaults | type: pub | family friendly: no``. That text is a record's
``instruction`` and the reference its ``output``, so any prompt template, packing and the normal
training loop apply unchanged (``data.format: e2e``). For scoring, references are grouped by MR:
the test set holds 4,693 references over 630 distinct MRs.
"""

from __future__ import annotations

import csv
import glob
import io
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.files import decode_utf8, split_lines, wide_csv_fields
from lorakit.data.formats import LINE_KEY, SOURCE_KEY, DataError

# The release's attribute order; every MR in train, dev and test already follows it.
ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
# Readable names in the rendered prompt (loralib renames eatType, priceRange, familyFriendly the same way).
DISPLAY = {"eatType": "type", "priceRange": "price", "familyFriendly": "family friendly"}
_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")

E2E_TEMPLATE = "{instruction}\nDescription:\n"
"""A short prompt: the rendered MR, then a cue line; the reference follows on the next line."""


def parse_mr(mr: str, at: str = "<mr>") -> list[tuple[str, str]]:
    """``"name[X], eatType[pub]"`` -> ``[("name", "X"), ("eatType", "pub")]``, in the given order.

    Raises:
        DataError: text that is not a comma-separated list of ``key[value]`` slots.
    """
    slots, pos = [], 0
    while pos < len(mr):
        match = _SLOT.match(mr, pos)
        if not match:
            raise DataError(f"{at}: meaning representation {mr!r} is not a list of key[value] slots at column {pos + 1}")
        slots.append((match.group(1), match.group(2).strip()))
        pos = match.end()
    if not slots:
        raise DataError(f"{at}: empty meaning representation; expected key[value] slots such as name[The Vaults]")
    return slots


def render_mr(mr: str, at: str = "<mr>") -> str:
    """The prompt text of an MR: canonical attribute order, readable names, ``key: value`` joined by `` | ``."""
    slots = parse_mr(mr, at)
    order = {name: i for i, name in enumerate(ATTRIBUTES)}
    slots.sort(key=lambda slot: order.get(slot[0], len(order)))  # stable: unknown keys keep their order, last
    return " | ".join(f"{DISPLAY.get(key, key)}: {value}" for key, value in slots)


def read_e2e_csv(path: str | Path) -> list[dict]:
    """Rows ``{mr, ref}`` of one official CSV, or of every file a glob pattern matches (sorted, joined).

    Each row keeps ``_source`` and ``_line`` (the line its record starts on) for error messages.

    Raises:
        FileNotFoundError: no file at ``path`` and no match for it as a pattern.
        DataError: a file without ``mr`` and ``ref`` columns, or a row with another column count.
    """
    paths = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
    if not paths or not Path(paths[0]).is_file():
        raise FileNotFoundError(f"E2E data file not found: {path}")
    rows: list[dict] = []
    for name in paths:
        rows += _read_one_csv(Path(name))
    return rows


def _read_one_csv(path: Path) -> list[dict]:
    text = decode_utf8(path.read_bytes(), str(path))  # bytes: read_text would turn a quoted CRLF into LF
    with wide_csv_fields():
        return _read_rows(text, path)


def _read_rows(text: str, path: Path) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [cell.strip() for cell in next(reader, [])]
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV header ({err})") from None
    if header[:2] != ["mr", "ref"]:
        raise DataError(f"{path}:1: expected the E2E header mr,ref, got {','.join(header) or 'nothing'}")
    rows = []
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: name the line the record starts on
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV row ({err})") from None
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{start}: expected 2 columns (mr, ref), got {len(row)}")
        rows.append({"mr": row[0], "ref": row[1], SOURCE_KEY: str(path), LINE_KEY: start})


def read_lora_format(path: str | Path) -> list[dict]:
    """Rows ``{mr, ref}`` of a loralib ``key : value | ...||reference`` file (references stay tokenised).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a non-empty line without the ``||`` separator.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E2E lora_format file not found: {path}")
    rows = []
    for line_no, line in enumerate(split_lines(decode_utf8(path.read_bytes(), str(path))), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(f"{path}:{line_no}: expected 'key : value | ...||reference', found no '||'")
        mr, ref = line.split("||", 1)
        rows.append({"mr": mr.strip(), "ref": ref.strip(), SOURCE_KEY: str(path), LINE_KEY: line_no})
    return rows


def to_instruction_records(rows: list[dict]) -> list[dict]:
    """E2E rows as instruction records: ``instruction`` = the rendered MR, ``output`` = the reference.

    Runs of whitespace in a reference become one space (two train references hold a line break).
    """
    records = []
    for row in rows:
        at = f"{row.get(SOURCE_KEY, '<rows>')}:{row.get(LINE_KEY, '?')}"
        records.append({
            "instruction": render_mr(row["mr"], at), "output": " ".join(row["ref"].split()), "mr": row["mr"],
            SOURCE_KEY: row.get(SOURCE_KEY), LINE_KEY: row.get(LINE_KEY),
        })
    return records


def read_e2e_records(path: str | Path) -> list[dict]:
    """The data layer's reader for ``data.format: e2e``: official CSV(s) -> instruction records."""
    return to_instruction_records(read_e2e_csv(path))


@dataclass
class GroupedReferences:
    """One entry per distinct MR, in order of first appearance."""

    mrs: list[str]
    references: list[list[str]]  # the original references of each MR
    rows: list[list[int]]  # the row indices of each MR's references (to align another reference set)

    def __len__(self) -> int:
        return len(self.mrs)

    @property
    def prompts(self) -> list[str]:
        """The rendered MRs (the instructions a model is given)."""
        return [render_mr(mr) for mr in self.mrs]

    def take(self, n: int | None) -> GroupedReferences:
        """The first ``n`` MRs (a stated, deterministic subset); all of them for None."""
        if n is None or n >= len(self):
            return self
        return GroupedReferences(self.mrs[:n], self.references[:n], self.rows[:n])


def group_references(rows: list[dict]) -> GroupedReferences:
    """Group the references of rows ``{mr, ref}`` by their MR (multi-reference scoring)."""
    index: dict[str, int] = {}
    grouped = GroupedReferences([], [], [])
    for i, row in enumerate(rows):
        if row["mr"] not in index:
            index[row["mr"]] = len(grouped.mrs)
            grouped.mrs.append(row["mr"])
            grouped.references.append([])
            grouped.rows.append([])
        grouped.references[index[row["mr"]]].append(row["ref"])
        grouped.rows[index[row["mr"]]].append(i)
    return grouped


def aligned_references(grouped: GroupedReferences, other_rows: list[dict], source: str = "<rows>") -> list[list[str]]:
    """Another reference set (e.g. lora_format's tokenised one, line i = row i) grouped as ``grouped``.

    Raises:
        DataError: ``other_rows`` is too short for the rows ``grouped`` refers to.
    """
    needed = max((i for rows in grouped.rows for i in rows), default=-1) + 1
    if len(other_rows) < needed:
        raise DataError(f"{source}: has {len(other_rows)} rows, expected at least {needed} (row i must match row i)")
    return [[other_rows[i]["ref"] for i in rows] for rows in grouped.rows]
