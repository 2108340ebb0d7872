"""Compare two GGUF files: tensors by name (type, shape, bytes) and metadata keys (values).

Used to hold lorakit's exports to llama.cpp's own converter, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np


@dataclass
class GgufDiff:
    """How file `b` differs from file `a`."""

    tensors_only_in_a: list[str] = field(default_factory=list)
    tensors_only_in_b: list[str] = field(default_factory=list)
    tensors_differing: list[str] = field(default_factory=list)  # same name, other type, shape or bytes
    tensors_equal: int = 0
    keys_only_in_a: dict[str, object] = field(default_factory=dict)
    keys_only_in_b: dict[str, object] = field(default_factory=dict)
    keys_differing: dict[str, tuple[object, object]] = field(default_factory=dict)

    @property
    def tensors_identical(self) -> bool:
        return not (self.tensors_only_in_a or self.tensors_only_in_b or self.tensors_differing)


def metadata(reader: gguf.GGUFReader) -> dict[str, object]:
    """Every key/value of a GGUF file except the header's own counts."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def diff_gguf(a: str | Path, b: str | Path) -> GgufDiff:
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    out = GgufDiff(sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta)))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        same = (
            x.tensor_type == y.tensor_type
            and list(x.shape) == list(y.shape)
            and np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8))
        )
        if same:
            out.tensors_equal += 1
        else:
            out.tensors_differing.append(name)
    ka, kb = metadata(ra), metadata(rb)
    out.keys_only_in_a = {k: ka[k] for k in sorted(set(ka) - set(kb))}
    out.keys_only_in_b = {k: kb[k] for k in sorted(set(kb) - set(ka))}
    out.keys_differing = {k: (ka[k], kb[k]) for k in sorted(set(ka) & set(kb)) if ka[k] != kb[k]}
    return out
