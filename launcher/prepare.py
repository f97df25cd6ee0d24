"""Prepare a recipe's data into the preparation cache, without a model or a process group:

    python -m launcher.prepare recipes/yelp_bert.yaml [section.key=value ...]

Tokenizes (in `data.num_proc` processes) exactly as the run will, and prints each split's rows and tokens, the
length percentiles, what was shortened or dropped, and the cache key and folder. Every later run of the recipe
(and `--check`, a requeue, a resume, each task of a sweep) reads the result back instead of tokenizing.
`launcher.submit --prepare` runs this as the job's first step, so training processes never tokenize.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    # Slurm jobs run this file as a script (`python launcher/prepare.py`, as run.py): import `launcher` as a package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402

from launcher.data.loaders import token_lengths  # noqa: E402
from launcher.data.sources import DataError  # noqa: E402
from launcher.model.loading import ModelError, check_max_length, load_tokenizer  # noqa: E402
from launcher.recipe.loading import RecipeError, load_recipe  # noqa: E402
from launcher.tasks import prepare_task_once  # noqa: E402

USER_ERRORS = (RecipeError, DataError, ModelError)
PERCENTILES = (50, 90, 99, 100)


def split_line(name: str, dataset, max_length: int) -> str:
    lengths = token_lengths(dataset)
    at = {p: int(np.percentile(lengths, p)) for p in PERCENTILES}
    full = int(np.count_nonzero(lengths >= max_length))
    return (f"{name:<6}{len(dataset):>10,} rows {int(lengths.sum()):>14,} tokens   length p50 {at[50]}, p90 {at[90]}, "
            f"p99 {at[99]}, max {at[100]}; {full:,} at max_length {max_length}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.prepare",
                                     description="Tokenize a recipe's data into the preparation cache.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides, as for run.py")
    args = parser.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        tokenizer = load_tokenizer(recipe.model)
        check_max_length(recipe, tokenizer)
        prepared, preparation = prepare_task_once(recipe, tokenizer)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(preparation.note())
    for name, dataset in (("train", prepared.data.train), ("eval", prepared.data.eval)):
        if dataset is not None:
            print(split_line(name, dataset, recipe.data.max_length))
    for note in prepared.notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
