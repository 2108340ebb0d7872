"""What a run loads: QLoRA's base in the type its checkpoint is stored in."""

from __future__ import annotations

import torch

from lorakit.config import QuantizationConfig, RunConfig
from lorakit.models import load_causal_lm
from lorakit.run import _load_dtype
from conftest import toy_model_folder


def test_qlora_loads_a_half_checkpoint_in_its_type_and_anything_else_in_fp32(tmp_path):
    folder = toy_model_folder(tmp_path / "model")
    load_causal_lm(folder).to(torch.bfloat16).save_pretrained(folder)
    qlora = RunConfig(model=str(folder), quantization=QuantizationConfig(bits=4))
    assert _load_dtype(qlora, quantize_now=True) == torch.bfloat16
    assert _load_dtype(qlora, quantize_now=False) == torch.float32  # LoftQ: quantised after inject, from fp32
    assert _load_dtype(RunConfig(model=str(folder)), quantize_now=True) == torch.float32  # no quantisation
    fp32 = toy_model_folder(tmp_path / "fp32")
    fp32_qlora = RunConfig(model=str(fp32), quantization=QuantizationConfig(bits=4))
    assert _load_dtype(fp32_qlora, quantize_now=True) == torch.float32
