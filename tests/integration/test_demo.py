"""The shipped demo recipe on the real pretrained MiniLM and real Rotten Tomatoes reviews (both from PyPI
wheels), one epoch of its 1,000 training snippets: accuracy must end clearly above the majority class."""

import csv
import json
from pathlib import Path

import pytest

from runs import run_in_process
from launcher.demo_assets import LABELS, VERDICTS, link_model, write_preference_pairs, write_splits
from launcher.train.run_directory import read_run_summary
from runs import REPO



@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    link_model(root)
    write_preference_pairs(root, write_splits(root))
    return root


def test_demo_assets_are_real_labeled_reviews(demo_root):
    with (demo_root / "data/rotten_tomatoes/test.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1000 and {r["label"] for r in rows} == set(LABELS)
    assert (demo_root / "models/all-MiniLM-L6-v2/model.safetensors").is_file()


@pytest.mark.slow
def test_minilm_learns_real_reviews_with_the_demo_recipe(demo_root):
    out = demo_root / "run"
    code = run_in_process(
        REPO / "recipes" / "demo.yaml",
        f"model.name_or_path={demo_root / 'models/all-MiniLM-L6-v2'}",
        f"data.train_file={demo_root / 'data/rotten_tomatoes/train.csv'}",
        f"data.eval_file={demo_root / 'data/rotten_tomatoes/test.csv'}",
        "data.train_samples=1000",  # the demo's 8,000 would take 2.3 minutes here; 1,000 shows it learns
        "training.epochs=1",
        "output.report_to=none",
        f"output.dir={out}",
    )
    assert code == 0
    final = read_run_summary(out)["final_eval"]
    assert final["examples"] == 400
    # The majority class (fresh) is 57% of these 400; one epoch of 1,000 snippets measured 0.715-0.77.
    assert final["accuracy"] >= 0.66, final


def test_sft_demo_recipe_checks_on_the_real_llm_and_reviews(demo_root, capsys):
    """`--check` on demo_sft.yaml renders and tokenizes every snippet with SmolLM2's chat template (converted from
    the wheel's GGUF file by scripts/setup.sh); its answers are single tokens, scored in one forward each."""
    llm = REPO / "models" / "SmolLM2-135M-Instruct"
    if not (llm / "model.safetensors").is_file():
        pytest.skip("run scripts/setup.sh (python -m launcher.demo_assets) to convert the demo LLM")
    from launcher.run import main

    code = main([str(REPO / "recipes" / "demo_sft.yaml"), "--check", f"model.name_or_path={llm}",
                 f"data.train_file={demo_root / 'data/rotten_tomatoes/train.csv'}",
                 f"data.eval_file={demo_root / 'data/rotten_tomatoes/test.csv'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "train 1000 / eval 400" in out and "answers: rotten -> 'negative', fresh -> 'positive'" in out
    assert "one forward per eval example" in out and "LM-head logits of the trained tokens" in out


def test_preference_pairs_are_the_reviews_with_their_verdict_chosen(demo_root):
    with (demo_root / "data/rotten_tomatoes/test.csv").open(encoding="utf-8") as handle:
        reviews = list(csv.DictReader(handle))
    pairs = [json.loads(line) for line in (demo_root / "data/rotten_tomatoes_pairs/test.jsonl").read_text().splitlines()]
    assert len(pairs) == len(reviews) == 1000
    for review, pair in zip(reviews, pairs):
        assert review["text"] in pair["prompt"] and pair["chosen"] == VERDICTS[review["label"]] != pair["rejected"]


@pytest.mark.parametrize(("recipe", "row"), [
    ("demo_reward.yaml", "reference model"), ("demo_dpo.yaml", "reference model (the same weights, adapters disabled: no copy)"),
])
def test_preference_demo_recipes_check_on_the_real_llm_and_pairs(demo_root, capsys, recipe, row):
    """`--check` renders and tokenizes every pair with SmolLM2's chat template; the DPO plan names its reference."""
    llm = REPO / "models" / "SmolLM2-135M-Instruct"
    if not (llm / "model.safetensors").is_file():
        pytest.skip("run scripts/setup.sh (python -m launcher.demo_assets) to convert the demo LLM")
    from launcher.run import main

    code = main([str(REPO / "recipes" / recipe), "--check", f"model.name_or_path={llm}",
                 f"data.train_file={demo_root / 'data/rotten_tomatoes_pairs/train.jsonl'}",
                 f"data.eval_file={demo_root / 'data/rotten_tomatoes_pairs/test.jsonl'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "preference pairs" in out and "check: ok" in out
    assert (row in out) == (recipe == "demo_dpo.yaml")
