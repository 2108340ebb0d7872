"""`lorakit merge-adapters A B ... --weights W1 W2 ... --method M --output DIR`"""

from __future__ import annotations

from lorakit.cli.parsing import non_empty, positive_int, subcommand

EXAMPLES = """examples:
  lorakit merge-adapters runs/a/adapter runs/b/adapter --weights 0.5 0.5 --output runs/ab   # exact (cat)
  lorakit merge-adapters A B --weights 0.5 0.5 --method ties --density 0.5 --output runs/ab-ties
  lorakit merge-adapters A B --weights 1 1 --method dare_ties --density 0.3 --seed 1 --output runs/ab-dare
  lorakit merge-adapters A B --weights 1 -0.5 --method svd --svd-rank 16 --output runs/a-minus-b
"""


def add_parser(commands) -> None:
    from lorakit.lora.weighted import COMBINATIONS, SIGN_METHODS

    parser = subcommand(
        commands,
        "merge-adapters",
        help="combine adapters into one adapter (TIES, DARE, SVD, exact concatenation)",
        description="Combine adapter folders trained on the same base into one PEFT-format adapter folder, as "
        "PEFT's add_weighted_adapter does. 'cat' is exact (the update is the weighted sum, rank the sum of the "
        "ranks); linear/ties/dare_linear/dare_ties/magnitude_prune combine the A's and the B's entry by entry "
        "(same rank needed); the *svd methods combine the updates and keep the top --svd-rank singular "
        "directions. The output folder must be new or empty and is written whole or not at all.",
        examples=EXAMPLES,
    )
    parser.add_argument("adapters", type=non_empty, nargs="+", metavar="ADAPTER", help="adapter folders (PEFT format)")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    parser.add_argument("--output", type=non_empty, required=True, help="the new adapter folder")
    parser.add_argument("--method", default="cat", choices=list(COMBINATIONS), metavar="METHOD",
                        help=f"how to combine: {', '.join(COMBINATIONS)} (default: cat)")
    parser.add_argument("--density", type=float, help="share of entries kept, in (0, 1]: ties, dare_*, magnitude_prune*")
    parser.add_argument("--majority-sign", default="total", choices=SIGN_METHODS,
                        help="TIES sign election: by summed value (total) or by count (frequency)")
    parser.add_argument("--svd-rank", type=positive_int,
                        help="rank of an *svd result (default: the largest adapter rank)")
    parser.add_argument("--svd-clamp", type=float, help="clamp the SVD factors at this quantile of their entries")
    parser.add_argument("--seed", type=int, help="seed of DARE's random masks (default 0)")
    parser.add_argument("--model", type=non_empty,
                        help="the adapters' base (default: the first adapter's base_model_name_or_path)")
    parser.set_defaults(run=run)


# add_weighted_adapter's parameters, as this command's flags
FLAGS = {"combination_type": "--method", "density": "--density", "majority_sign_method": "--majority-sign",
         "svd_rank": "--svd-rank", "svd_clamp": "--svd-clamp", "weights": "--weights"}


def as_flags(problem: str) -> str:
    """A problem that names an add_weighted_adapter parameter, naming this command's flag instead ('density: given
    None' -> '--density: not given')."""
    name = problem.split(":", 1)[0].split(" ", 1)[0]
    if name not in FLAGS:
        return problem
    return FLAGS[name] + problem[len(name):].replace(": given None;", ": not given;", 1)


def run(args, _overrides) -> int:
    from lorakit.checkpoint.combine import combine_adapter_folders
    from lorakit.config import ConfigError
    from lorakit.output_folders import check_new_folder

    if args.seed is not None and "dare" not in args.method:
        raise ConfigError(f"--seed: given {args.seed}, which '{args.method}' does not use (it seeds the dare_* "
                          "methods' masks)")
    check_new_folder(args.output, "--output", [*args.adapters, *([args.model] if args.model else [])])
    try:
        config = combine_adapter_folders(
            args.adapters, args.weights, args.output, args.method, args.model, density=args.density,
            majority_sign_method=args.majority_sign, svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
            seed=args.seed or 0,
        )
    except ConfigError as err:
        raise ConfigError.of([as_flags(problem) for problem in err.problems]) from None
    print(f"{args.method} of {len(args.adapters)} adapters (rank {config.r}) written to {args.output}")
    return 0
