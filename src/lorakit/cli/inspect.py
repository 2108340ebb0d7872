"""`lorakit inspect DIR`: what an adapter folder holds."""

from __future__ import annotations

from pathlib import Path

from lorakit.cli.parsing import non_empty, subcommand

EXAMPLES = """examples:
  lorakit inspect runs/ros2-demo/adapter
"""


def add_parser(commands) -> None:
    parser = subcommand(
        commands,
        "inspect",
        help="summarise a PEFT-format adapter folder",
        description="Print an adapter's config, its modules and ranks, its size and whether it was trained.",
        examples=EXAMPLES,
    )
    parser.add_argument("adapter", type=non_empty, help="a PEFT-format adapter folder")
    parser.set_defaults(run=run)


def run(args, _overrides) -> int:
    from lorakit.checkpoint.peft_io import (
        CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_adapter_config, read_adapter_weights, read_json_object,
    )

    config = read_adapter_config(args.adapter)
    tensors = read_adapter_weights(args.adapter)
    lora = {k: v for k, v in tensors.items() if ".lora_" in k and ".lora_magnitude_vector" not in k}  # DoRA's: 1-D
    flat = [k for k, v in lora.items() if v.dim() != 2]
    if flat:
        raise AdapterError(f"{Path(args.adapter) / WEIGHTS_NAME}: {flat[0]} has shape {tuple(lora[flat[0]].shape)}; "
                           "expected a LoRA factor of two dimensions")
    modules = sorted({k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in lora})
    ranks = sorted({v.shape[0] for k, v in lora.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))})
    trained = any(v.any() for k, v in lora.items() if k.endswith(("lora_B.weight", "lora_embedding_A")))
    size = (Path(args.adapter) / WEIGHTS_NAME).stat().st_size
    print(f"adapter: {args.adapter}")
    print(f"base model: {config.base_model_name_or_path}")
    given = read_json_object(Path(args.adapter) / CONFIG_NAME, "an object of LoRA settings")
    r, alpha = (f"{getattr(config, k)}{'' if k in given else ' (unset: the default)'}" for k in ("r", "lora_alpha"))
    print(f"task: {config.task_type}   r: {r}   alpha: {alpha}   rslora: {config.use_rslora}   dora: {config.use_dora}")
    print(f"target modules: {config.target_modules}   modules to save: {config.modules_to_save}")
    print(f"LoRA modules: {len(modules)}   ranks: {ranks}   tensors: {len(tensors)}")
    print(f"parameters: {sum(v.numel() for v in tensors.values()):,d}   file: {size / 1e6:.2f} MB")
    print(f"trained (non-zero update): {'yes' if trained else 'no'}")
    return 0
