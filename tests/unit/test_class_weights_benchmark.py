"""benchmarks/class_weights.py builds its data sets as it says: eval in the corpus's proportions, train with the
minority at the asked share, no text in both, the same draw for the same seed. No training here."""

import csv
from collections import Counter

import pytest

from benchmarks.class_weights import LABELS, balanced_weights, draw_splits, main, proportional_counts, table


def corpus(counts: dict[str, int]) -> list[dict[str, str]]:
    return [{"text": f"{label} {i}", "label": label} for label, n in counts.items() for i in range(n)]


def test_proportional_counts_sum_to_the_total():
    counts = proportional_counts(600, Counter(rotten=5405, fresh=7403, plot=1097))
    assert sum(counts.values()) == 600 and counts == {"rotten": 233, "fresh": 320, "plot": 47}


def test_splits_keep_eval_natural_shrink_the_minority_in_train_and_never_overlap():
    rows = corpus({"rotten": 500, "fresh": 400, "plot": 100})
    train, evaluation = draw_splits(rows, train_rows=200, eval_rows=100, plot_share=0.02, seed=3)
    assert Counter(r["label"] for r in evaluation) == {"rotten": 50, "fresh": 40, "plot": 10}
    assert Counter(r["label"] for r in train) == {"rotten": 109, "fresh": 87, "plot": 4}
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    assert (train, evaluation) == draw_splits(rows, 200, 100, 0.02, seed=3)
    weights = balanced_weights(train)
    assert round(weights["plot"], 3) == round(200 / (3 * 4), 3)
    assert abs(sum(weights[r["label"]] for r in train) / len(train) - 1) < 1e-9  # they average 1 over the examples


def test_data_only_writes_the_real_corpus_csv_files(tmp_path, capsys):
    assert main(["--data-only", "--train-rows", "60", "--eval-rows", "30", "--plot-share", "0.05",
                 "--work-dir", str(tmp_path)]) == 0
    with (tmp_path / "train.csv").open(encoding="utf-8") as handle:
        train = list(csv.DictReader(handle))
    assert len(train) == 60 and {r["label"] for r in train} == set(LABELS)
    assert "plot 3 (5.0%)" in capsys.readouterr().out


def test_table_has_a_row_per_run_and_a_median_row_per_weighting():
    runs = [{"weighting": weighting, "seed": seed, "accuracy": 0.7 + seed / 100, "f1_macro": 0.5,
             "minority_recall": recall, "minority_precision": 1.0, "minority_f1": 0.5, "minority_predicted": 3,
             "process_seconds": 90.0, "load_1min_before": 1.0}
            for weighting, recall in (("unweighted", 0.0), ("balanced", 0.5)) for seed in (1, 2, 3)]
    lines = table(runs).splitlines()
    assert len(lines) == 2 + 2 * 4
    assert lines[5].startswith("| **unweighted** | median [min, max] | **0.720** [0.710, 0.730] | **0.500** [0.500, 0.500]")
    assert lines[9].split(" | ")[4] == "**0.500** [0.500, 0.500]"  # balanced: plot recall


def test_help_shows_how_to_reproduce(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "python -m benchmarks.class_weights" in capsys.readouterr().out
