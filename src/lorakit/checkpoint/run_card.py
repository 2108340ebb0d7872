"""`lorakit.json` beside an adapter's PEFT files: how it was trained, so generate/eval/serve can do the same.

It holds the prompt template, the eval task, the model, the base's quantisation and, for a
classifier, its labels and max length. Adapters from elsewhere have none; readers then fall back.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_CARD = "lorakit.json"


def write_run_card(adapter_dir: str | Path, **fields) -> None:
    (Path(adapter_dir) / RUN_CARD).write_text(json.dumps(fields, indent=1) + "\n", encoding="utf-8")


def read_run_card(adapter_dir: str | Path | None) -> dict:
    """The run card's fields, or {} when the folder has none (or no folder is given).

    Raises:
        AdapterError: the card is not a JSON object (damaged, or not lorakit's), or a field it holds is not of
            the type its readers take.
    """
    from lorakit.checkpoint.peft_io import read_json_object  # peft_io reads the card's neighbours the same way

    from lorakit.checkpoint.peft_io import AdapterError

    path = Path(adapter_dir) / RUN_CARD if adapter_dir else None
    if not path or not path.is_file():
        return {}
    card = read_json_object(path, "lorakit's run card (an object), or no file")
    for key, kinds, expected in _FIELDS:
        if card.get(key) is not None and (not isinstance(card[key], kinds) or isinstance(card[key], bool)):
            raise AdapterError(f"{path}: {key}: given {card[key]!r}, expected {expected}")
    return card


# the fields readers use, with the types they take (null or missing: the reader's fallback)
_FIELDS = [("template", str, "a template name or format string"), ("task", str, "a task name"),
           ("labels", list, "a list of label names"), ("max_length", int, "a number of tokens"),
           ("quantization", dict, "an object of quantisation settings")]
