"""SST-2 with LoRA on the embedded MiniLM: dev accuracy, trainable share, adapter size, wall time.

    python bench/sst2.py [--config examples/sst2/config.yaml] [--section.key VALUE ...]

Trains with the shipped config (the third seed's recipe), keeps the best checkpoint by dev
accuracy, leaves its adapter in runs/sst2/adapter/, and prints one summary table (also written to
runs/sst2/bench.json). It runs for a long while on a 2-core CPU; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorakit.config_loading import load_run_config
from lorakit.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/sst2/config.yaml")
    args, overrides = parser.parse_known_args()
    config = load_run_config(args.config, overrides)
    started = time.time()
    summary = run(config)
    adapter = Path(summary["adapter"]) / "adapter_model.safetensors"
    row = {
        "model": config.model,
        "dev_accuracy": summary["best_metric"],
        "dev_macro_f1": summary["eval"].get("eval_macro_f1"),
        "trainable_percent": round(100 * summary["trainable_share"], 3),
        "adapter_mb": round(adapter.stat().st_size / 1e6, 3),
        "train_seconds": summary["seconds"],
        "wall_seconds": round(time.time() - started, 1),
        "steps": summary["steps"],
        "adapter": summary["adapter"],
    }
    Path(config.train.output_dir, "bench.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    width = max(map(len, row))
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
