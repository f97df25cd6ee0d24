"""The benchmark harness end to end on the tiny BERT: both tutorial baselines and launcher variants, a few steps."""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from builders import sentiment_rows, write_csv
from recipes import tiny_recipe, write_recipe
from runs import REPO, run_in_process

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(REPO))

from benchmarks.accuracy_table import accuracy_table  # noqa: E402
from benchmarks.accuracy_table import main as accuracy_table_main  # noqa: E402
from benchmarks.compare import main as compare_main  # noqa: E402
from benchmarks.measure import MeasureError, measure_run, ratios, summarize_repeats  # noqa: E402
from benchmarks.flops import TransformerShape  # noqa: E402
from launcher.train.reporting import read_metrics_log  # noqa: E402

SHAPE = TransformerShape(non_embedding_params=1000, layers=2, heads=2, head_dim=16)
LOG = [
    {"kind": "train", "step": 1, "samples": 8, "real_tokens": 40, "padded_tokens": 80, "step_seconds": 9.0},
    {"kind": "train", "step": 2, "samples": 8, "real_tokens": 60, "padded_tokens": 64, "step_seconds": 0.5},
    {"kind": "train", "step": 3, "samples": 4, "real_tokens": 20, "padded_tokens": 32, "step_seconds": 1.5},
    {"kind": "eval", "step": 3, "accuracy": 0.75, "examples": 32},
]


def test_measure_skips_warmup_and_sums_the_rest():
    run = measure_run(LOG, warmup_steps=1, shape=SHAPE, peak=None, devices=1)
    assert run["steps_measured"] == 2
    assert run["samples_per_s"] == pytest.approx(12 / 2.0)
    assert run["real_tokens_per_s"] == pytest.approx(80 / 2.0)
    assert run["padded_tokens_per_s"] == pytest.approx(96 / 2.0)
    assert run["padding_efficiency"] == pytest.approx(80 / 96)
    assert run["step_seconds"] == {"min": 0.5, "median": 1.0, "max": 1.5}
    # Per step: 60 tokens at T=7.5 and 20 tokens at T=5, each at 6N + 12*L*H*Q*T FLOPs per token.
    flops = 60 * (6000 + 768 * 7.5) + 20 * (6000 + 768 * 5)
    assert run["model_flops_per_s"] == pytest.approx(flops / 2.0)
    assert run["mfu"] is None and run["accuracy"] == 0.75


def test_measure_refuses_a_log_with_nothing_after_warmup():
    with pytest.raises(MeasureError, match="warm-up"):
        measure_run(LOG, warmup_steps=3, shape=SHAPE, peak=None, devices=1)


def test_ratios_are_median_over_median():
    fast = summarize_repeats([{"samples_per_s": s, "real_tokens_per_s": 2 * s, "accuracy": 0.8,
                               "step_seconds": {"min": 1, "median": 1, "max": 1}} for s in (10.0, 30.0, 20.0)])
    slow = summarize_repeats([{"samples_per_s": 5.0, "real_tokens_per_s": 5.0, "accuracy": 0.7,
                               "step_seconds": {"min": 1, "median": 1, "max": 1}}])
    assert fast["samples_per_s"] == {"min": 10.0, "median": 20.0, "max": 30.0}
    assert ratios(fast, slow) == pytest.approx({"samples_per_s_x": 4.0, "real_tokens_per_s_x": 8.0, "accuracy_delta": 0.1})


def comparison(seed: int, values: dict[str, float], metric: str = "accuracy") -> dict:
    """The parts of a `benchmarks.compare` result file the accuracy table reads."""
    variants = [{"name": name, "summary": {metric: {"min": v, "median": v, "max": v}}} for name, v in values.items()]
    variants.append({"name": "launcher_bf16", "summary": {}})  # skipped on this hardware: no accuracy, no row
    return {"recipe": {"training": {"seed": seed}}, "variants": variants}


def test_accuracy_table_pairs_each_seed_with_the_baseline():
    results = [comparison(42, {"base": 0.70, "fast": 0.72}), comparison(1, {"base": 0.68, "fast": 0.65})]
    table = accuracy_table(results, against="base").splitlines()
    assert table[0] == "| variant | seed 1 | seed 42 | mean | minus base: mean ± s.e. [min, max] |"
    assert table[2] == "| base | 0.680 | 0.700 | 0.690 | +0.000 ± 0.000 [+0.000, +0.000] |"
    # differences -0.03 and +0.02: standard deviation 0.0354, over sqrt(2) seeds
    assert table[3] == "| fast | 0.650 | 0.720 | 0.685 | -0.005 ± 0.025 [-0.030, +0.020] |"
    assert len(table) == 4
    with pytest.raises(ValueError, match="--against missing: accuracy not measured in every result file"):
        accuracy_table(results, against="missing")
    with pytest.raises(ValueError, match="--against base: eval_loss not measured"):
        accuracy_table(results, against="base", metric="eval_loss")


def test_accuracy_table_tabulates_eval_loss_on_request(tmp_path, capsys):
    results = [comparison(3, {"base": 0.55, "fast": 0.60}, metric="eval_loss")]
    table = accuracy_table(results, against="base", metric="eval_loss").splitlines()
    assert table[3] == "| fast | 0.600 | 0.600 | +0.050 ± 0.000 [+0.050, +0.050] |"
    # Files from before the harness logged eval loss: a one-line error, not a traceback.
    (tmp_path / "old.json").write_text(json.dumps(comparison(1, {"base": 0.7})))
    assert accuracy_table_main([str(tmp_path / "old.json"), "--against", "base", "--metric", "eval_loss"]) == 1
    assert capsys.readouterr().err == "error: --against base: eval_loss not measured in every result file\n"


def test_compare_runs_baselines_and_launcher_and_writes_consistent_results(assets, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "unused"))
    code = compare_main([
        str(recipe), "--samples", "32", "--warmup-steps", "1", "--repeats", "1",
        "--variants", "tutorial_max_length,tutorial_dynamic,launcher_group_by_length,launcher_packed",
        "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--name", "tiny",
    ])
    assert code == 0
    result = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert "launcher_packed" not in {v["name"] for v in result["variants"]}, "BERT cannot pack: the variant is skipped"
    assert (tmp_path / "results" / "tiny.png").stat().st_size > 0
    assert "| launcher_group_by_length |" in (tmp_path / "results" / "tiny.md").read_text()
    assert result["machine"]["cpu_cores_logical"] >= 1 and result["machine"]["libraries"]["torch"]
    assert result["recipe"]["model"]["name_or_path"] == str(assets["bert"])
    variants = {v["name"]: v for v in result["variants"]}
    for variant in variants.values():
        run = variant["runs"][0]
        steps = [r for r in read_metrics_log(run["log_dir"]) if r["kind"] == "train"]
        assert len(steps) == 32 // 8, "every variant sees the same samples"
        measured = steps[1:]
        assert run["samples_measured"] == 24
        assert run["padding_efficiency"] == pytest.approx(
            sum(r["real_tokens"] for r in measured) / sum(r["padded_tokens"] for r in measured))
        assert run["samples_per_s"] == pytest.approx(24 / sum(r["step_seconds"] for r in measured))
        assert run["eval_examples"] == 32 and 0.0 <= run["accuracy"] <= 1.0 and run["eval_loss"] > 0.0
        assert run["peak_rss_bytes"] > 50 * 2**20
        assert variant["ratios"]["tutorial_dynamic"]["samples_per_s_x"] == pytest.approx(
            variant["summary"]["samples_per_s"]["median"] / variants["tutorial_dynamic"]["summary"]["samples_per_s"]["median"])
    # The tutorial's max_length way pads every text to the model's 128 positions (322 does not fit the tiny BERT).
    max_length_run = variants["tutorial_max_length"]["runs"][0]
    assert max_length_run["padded_tokens_per_s"] / max_length_run["samples_per_s"] == pytest.approx(128)
    assert variants["launcher_group_by_length"]["runs"][0]["padding_efficiency"] > max_length_run["padding_efficiency"]
    # Every variant truncates where the recipe says (64); the report names the lengths each one used.
    assert {name: v["lengths"] for name, v in variants.items()} == {
        "tutorial_max_length": {"truncate_at": 64, "pad_to": 128}, "tutorial_dynamic": {"truncate_at": 64, "pad_to": "batch"},
        "launcher_group_by_length": {"truncate_at": 64, "pad_to": "batch"},
    }
    read = max_length_run["real_tokens_per_s"] / max_length_run["samples_per_s"]
    assert f"| tutorial_max_length | 64 / 128, {read:.0f} read |" in (tmp_path / "results" / "tiny.md").read_text()


def long_text_recipe(assets, tmp_path, model="bert"):
    """News-article-like texts: every one is longer than the recipe's `data.max_length` of 16."""
    from launcher.recipe.loading import load_recipe

    rows = sentiment_rows(32, seed=4)
    for row in rows:
        row["text"] = " ".join([row["text"]] * 8)  # 24 to 120 words
    data = write_csv(tmp_path / "long.csv", rows)
    recipe = tiny_recipe(assets, tmp_path / "unused", model=model, data={"train_file": str(data), "eval_file": str(data), "max_length": 16})
    return load_recipe(write_recipe(tmp_path / "long.yaml", recipe))


@pytest.mark.parametrize("way, pad_to", [("dynamic", 16), ("max_length", 128)])
def test_baselines_truncate_long_texts_at_the_recipes_max_length(assets, tmp_path, way, pad_to):
    """Same work as the launcher: 16 real tokens a sample, not the tokenizer's `model_max_length` of 128. The padded
    way still pads to the tutorial's 322 (here the tiny model's 128 positions)."""
    from benchmarks.tutorial_baselines import run_baseline

    *steps, evaluation = run_baseline(long_text_recipe(assets, tmp_path), way, steps=2, out=tmp_path / way)
    assert all((r["real_tokens"], r["padded_tokens"]) == (16 * r["samples"], pad_to * r["samples"]) for r in steps), steps
    assert (evaluation["truncate_at"], evaluation["pad_to"]) == (16, "batch" if way == "dynamic" else 128)


def test_padded_baseline_pads_to_data_max_length_where_that_is_longer(assets, tmp_path, monkeypatch):
    import benchmarks.tutorial_baselines as tutorial

    monkeypatch.setattr(tutorial, "TUTORIAL_MAX_LENGTH", 8)
    assert tutorial.baseline_lengths(long_text_recipe(assets, tmp_path), "max_length") == {"truncate_at": 16, "pad_to": 16}


def test_dynamic_baseline_trains_a_decoder_whose_tokenizer_has_no_length_limit(assets, tmp_path):
    """Decoder tokenizers report `model_max_length = 1e30`; truncating there raised OverflowError."""
    from transformers import AutoTokenizer

    from benchmarks.tutorial_baselines import run_baseline

    folder = shutil.copytree(assets["llama"], tmp_path / "llama_unlimited")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = int(1e30)
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).model_max_length == int(1e30)
    recipe = long_text_recipe({**assets, "llama_unlimited": folder}, tmp_path, model="llama_unlimited")
    *steps, evaluation = run_baseline(recipe, "dynamic", steps=2, out=tmp_path / "run")
    assert all(r["real_tokens"] == 16 * r["samples"] for r in steps) and evaluation["examples"] == 32


def reseeding_dropout(load_model):
    """A model loader whose models reseed torch before every training forward (seed = forward count), so two loops
    that run the same batches draw the same dropout masks whatever else they take from the global generator."""
    def load(*args):
        model, notes = load_model(*args)
        forwards = itertools.count(1)

        def reseed(module, inputs):
            if module.training:
                torch.manual_seed(next(forwards))

        model.register_forward_pre_hook(reseed)
        return model, notes
    return load


def test_launcher_loop_trains_exactly_like_the_transformers_trainer_given_the_same_randomness(assets, tmp_path, monkeypatch):
    """The accuracy comparison is fair only if the two loops do the same arithmetic. Both draw the head's
    initialisation right after `set_seed(seed)`; given also the launcher's example order and the same dropout masks,
    the `Trainer` must end at the launcher's eval loss to float rounding (measured: identical weights)."""
    import benchmarks.tutorial_baselines as tutorial
    import launcher.run
    from transformers import Trainer

    from launcher.data.sampling import EpochShuffleSampler
    from launcher.recipe.loading import load_recipe

    monkeypatch.setattr(launcher.run, "load_model", reseeding_dropout(launcher.run.load_model))
    recipe_path = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "launcher", training={"epochs": 1}))
    assert run_in_process(recipe_path) == 0
    launcher_eval = [r for r in read_metrics_log(tmp_path / "launcher") if r["kind"] == "eval"][-1]

    recipe = load_recipe(recipe_path)
    launcher_order = EpochShuffleSampler(64, recipe.training.seed, recipe.training.per_device_batch_size)

    class LauncherOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return launcher_order

    monkeypatch.setattr(tutorial, "load_model", reseeding_dropout(tutorial.load_model))
    monkeypatch.setattr(tutorial, "Trainer", LauncherOrderTrainer)
    trainer_eval = tutorial.run_baseline(recipe, "dynamic", steps=64 // 8, out=tmp_path / "trainer")[-1]
    assert trainer_eval["loss"] == pytest.approx(launcher_eval["loss"], rel=1e-5)
    assert trainer_eval["accuracy"] == launcher_eval["accuracy"]
    # The check can fail: the Trainer's own order alone moves the eval loss far beyond rounding.
    monkeypatch.setattr(tutorial, "Trainer", Trainer)
    shuffled_eval = tutorial.run_baseline(recipe, "dynamic", steps=64 // 8, out=tmp_path / "shuffled")[-1]
    assert shuffled_eval["loss"] != pytest.approx(launcher_eval["loss"], rel=1e-3)


def test_packed_variant_of_a_decoder_computes_no_padding_and_sees_the_same_samples(assets, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "unused", model="llama"))
    code = compare_main([
        str(recipe), "--samples", "32", "--warmup-steps", "1", "--repeats", "1", "--variants", "launcher_dynamic,launcher_packed",
        "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--name", "llama",
    ])
    assert code == 0
    runs = {v["name"]: v["runs"][0] for v in json.loads((tmp_path / "results" / "llama.json").read_text())["variants"]}
    assert runs["launcher_packed"]["padding_efficiency"] == 1.0 > runs["launcher_dynamic"]["padding_efficiency"]
    assert runs["launcher_packed"]["samples_measured"] == runs["launcher_dynamic"]["samples_measured"] == 24
    assert runs["launcher_packed"]["real_tokens_per_s"] * runs["launcher_packed"]["seconds_measured"] == pytest.approx(
        runs["launcher_dynamic"]["real_tokens_per_s"] * runs["launcher_dynamic"]["seconds_measured"])


@pytest.mark.slow
def test_compare_aggregates_a_two_process_launch_across_ranks(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the cpu_ddp topology's gloo group (accelerate_configs/cpu_ddp.yaml)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "unused"))
    launch = f"{sys.executable} -m accelerate.commands.launch --config_file {REPO / 'accelerate_configs' / 'cpu_ddp.yaml'}"
    code = compare_main([
        str(recipe), "--samples", "64", "--warmup-steps", "1", "--repeats", "1", "--variants", "launcher_dynamic",
        "--launch", launch, "--processes", "2",
        "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--name", "ddp",
    ])
    assert code == 0
    result = json.loads((tmp_path / "results" / "ddp.json").read_text())
    assert result["settings"]["processes"] == 2
    assert "| samples/s per device |" in (tmp_path / "results" / "ddp.md").read_text()
    (run,) = result["variants"][0]["runs"]
    steps = [r for r in read_metrics_log(run["log_dir"]) if r["kind"] == "train"]
    # 64 samples at a global batch of 8 x 2 ranks: 4 steps, each record summed over both ranks.
    assert [r["samples"] for r in steps] == [16, 16, 16, 16]
    assert run["samples_measured"] == 48
    assert run["samples_per_s"] == pytest.approx(48 / sum(r["step_seconds"] for r in steps[1:]))
    assert run["samples_per_s_per_device"] == pytest.approx(run["samples_per_s"] / 2)
    assert "--num_processes" not in result["variants"][0]["command"] and "cpu_ddp.yaml" in result["variants"][0]["command"]
    # Peak memory is the whole process tree: the launcher and both ranks, each holding a copy of the model (one
    # process of this tiny run peaks at about 570 MiB here; the tree measured 1.36 GiB).
    assert run["peak_rss_bytes"] > 800 * 2**20


@pytest.mark.parametrize("optimizers", [
    "torch_fused,torch_foreach",
    pytest.param("torch_fused,deepspeed_cpu_adam", marks=pytest.mark.slow),  # builds DeepSpeed's C++ op: about a minute
])
def test_host_adamw_times_each_optimizer_and_checks_it_computes_adamw(tmp_path, monkeypatch, optimizers):
    from benchmarks.host_adamw import main as host_adamw_main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert host_adamw_main(["--params", "10000", "--repeats", "3", "--optimizers", optimizers,
                            "--results-dir", str(tmp_path), "--name", "adamw"]) == 0
    result = json.loads((tmp_path / "adamw.json").read_text())
    assert list(result["optimizers"]) == optimizers.split(",")
    for row in result["optimizers"].values():
        assert 0 < row["step_ms"]["min"] <= row["step_ms"]["median"] <= row["step_ms"]["max"]
        assert row["max_abs_difference"] < 1e-5  # rounding: measured 1e-6; Adam with L2 decay instead: 8e-4
    assert result["optimizers"]["torch_fused"]["max_abs_difference"] == 0.0
    assert "| torch_fused |" in (tmp_path / "adamw.md").read_text()


@pytest.mark.slow
def test_async_checkpoint_benchmark_measures_both_saves(tmp_path):
    """The smoke shape (a 2-layer Llama) through `python -m benchmarks.async_checkpoint`: both saves timed, the
    launcher's checkpoint sealed, the async one written, the table drawn from what was measured."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.async_checkpoint", "--size", "smoke", "--repeats", "2",
                           "--work", str(tmp_path / "work"), "--results-dir", str(tmp_path), "--name", "smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert len(result["launcher_save"]) == len(result["accelerate_write"]) == len(result["async_save"]) == 2
    assert all(save["critical_s"] > 0 and save["bytes"] > 1e6 for save in result["launcher_save"] + result["accelerate_write"])
    assert all(save["write_done_s"] >= save["blocked_s"] > 0 and save["bytes"] > 1e6 for save in result["async_save"])
    assert (tmp_path / "work" / "launcher" / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    # The table reports what was measured: each row's median critical-path cost, as the JSON holds it.
    table = (tmp_path / "smoke.md").read_text()
    for row, key in (("launcher (`save_state`", "launcher_save"), ("Accelerate's `save_state` alone", "accelerate_write"),
                     ("`torch.distributed.checkpoint.async_save`", "async_save")):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row}"))
        median = statistics.median(save["critical_s"] for save in result[key])
        assert f"/ {median:.2f} /" in line.split("|")[4], (row, line)
