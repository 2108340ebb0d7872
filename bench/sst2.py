"""SST-2 with LoRA on the embedded MiniLM: GLUE dev accuracy and macro-F1, trainable share, adapter size, time.

    python bench/sst2.py [--config examples/sst2/config.yaml] [--section.key VALUE ...]

Trains with the shipped config (the third seed's recipe). The checkpoint is chosen by accuracy on
a slice held out of the training set (data.eval_size, seeded); GLUE's dev set (data.test_file) is
scored once, with that checkpoint: accuracy and macro-F1 come from that one evaluation. The
adapter is left in runs/sst2/adapter/. Prints one summary table and writes runs/bench/sst2.json.
It runs for a long while on a 2-core CPU; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from results import machine, write_result

from lorakit.config_loading import load_run_config
from lorakit.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/sst2/config.yaml")
    parser.add_argument("--results-dir", default=None, help="where sst2.json goes (default runs/bench)")
    args, overrides = parser.parse_known_args()
    config = load_run_config(args.config, overrides)
    config.train.overwrite_output_dir = True  # a bench run replaces its last one
    if not config.data.test_file:
        parser.error("the config has no data.test_file: GLUE dev must be the test split, scored once")
    started = time.time()
    summary = run(config)
    adapter = Path(summary["adapter"]) / "adapter_model.safetensors"
    selection, dev = summary["selection"], summary["final_score"]["scores"]
    row = {
        "model": config.model,
        "dev_accuracy": dev["test_accuracy"],
        "dev_macro_f1": dev["test_macro_f1"],
        "chosen_on": selection["source"],
        "selection_accuracy": selection["value"],
        "checkpoint": Path(selection["checkpoint"]).name if selection["value"] is not None else selection["checkpoint"],
        "trainable_percent": round(100 * summary["trainable_share"], 3),
        "adapter_mb": round(adapter.stat().st_size / 1e6, 3),
        "train_seconds": summary["seconds"],
        "wall_seconds": round(time.time() - started, 1),
        "steps": summary["steps"],
    }
    path = write_result(
        "sst2", "SST-2 (GLUE dev) with LoRA on MiniLM-L6", [row],
        description=(f"{args.config}: the checkpoint is chosen by accuracy on {selection['source']}; GLUE dev "
                     f"({config.data.test_file}) is scored once with it, accuracy and macro-F1 from that one "
                     "evaluation."),
        columns=[("model", "model"), ("dev_accuracy", "dev accuracy"), ("dev_macro_f1", "dev macro-F1"),
                 ("selection_accuracy", "accuracy on the selection slice"), ("checkpoint", "chosen checkpoint"),
                 ("trainable_percent", "trainable %"), ("adapter_mb", "adapter MB"), ("steps", "steps"),
                 ("train_seconds", "train s"), ("wall_seconds", "wall s")],
        machine_info=machine(), out_dir=args.results_dir,
    )
    width = max(map(len, row))
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
