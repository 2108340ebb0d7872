"""Write the ROS 2 instruction→command splits (train.jsonl, valid.jsonl, test.jsonl) to a folder.

Usage: ``python examples/ros2/make_data.py [OUT_DIR] [--n-train 2000] [--n-valid 200] [--n-test 200] [--seed 0]``.
Train is what the model learns from, valid is what picks the checkpoint (data.eval_file), test is
scored once at the end (data.test_file). The three share no phrasing and no number pair. The files
are generated, never committed; see ``lorakit.tasks.ros2`` for the grammar and split rule.

It also writes the multi-turn conversations (``chat_train.jsonl``, ``chat_valid.jsonl``,
``chat_test.jsonl``; ``lorakit.tasks.ros2_chat``) that ``examples/ros2/chat.yaml`` trains on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lorakit.tasks.ros2 import DEFAULT_SIZES, write_splits
from lorakit.tasks.ros2_chat import DEFAULT_CHAT_SIZES, write_chat_splits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("runs/ros2-data"),
                        help="folder to write into (default: runs/ros2-data)")
    parser.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"], help="training records")
    parser.add_argument("--n-valid", type=int, default=DEFAULT_SIZES["valid"],
                        help="validation records (checkpoint selection)")
    parser.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"], help="test records (the final score)")
    for split, n in DEFAULT_CHAT_SIZES.items():
        parser.add_argument(f"--chat-{split}", type=int, default=n, help=f"{split} conversations")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_splits(args.out_dir, args.n_train, args.n_test, args.seed, args.n_valid)  # each split logs its line
    write_chat_splits(args.out_dir, {split: getattr(args, f"chat_{split}") for split in DEFAULT_CHAT_SIZES}, args.seed)


if __name__ == "__main__":
    main()
