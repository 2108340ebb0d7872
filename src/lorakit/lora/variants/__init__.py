"""LoRA variants, one file each. A LoraConfig flag (PEFT's field name) picks the variant's adapter class.

A new variant is a file here with a subclass of `LoraAdapter` (see variants/lora.py for what it
answers) and one line in `VARIANTS`.
"""

from __future__ import annotations

from lorakit.lora.variants.dora import DoraAdapter
from lorakit.lora.variants.lora import LoraAdapter

# LoraConfig flag -> the adapter class it selects; with no flag set, plain LoRA.
VARIANTS: dict[str, type[LoraAdapter]] = {
    "use_dora": DoraAdapter,
}


def variant_for(config) -> type[LoraAdapter]:
    """The adapter class `config` asks for (its flags are checked to be exclusive by LoraConfig)."""
    return next((cls for flag, cls in VARIANTS.items() if getattr(config, flag, False)), LoraAdapter)


__all__ = ["VARIANTS", "LoraAdapter", "variant_for"]
