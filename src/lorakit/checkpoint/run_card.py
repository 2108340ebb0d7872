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
        AdapterError: the card is not a JSON object (damaged, or not lorakit's).
    """
    from lorakit.checkpoint.peft_io import AdapterError

    path = Path(adapter_dir) / RUN_CARD if adapter_dir else None
    if not path or not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err}); expected lorakit's run card, or no file") from None
    if not isinstance(card, dict):
        raise AdapterError(f"{path}: holds a JSON {type(card).__name__}; expected lorakit's run card (an object)")
    return card
