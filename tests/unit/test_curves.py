"""curves.png: drawn from metrics.jsonl (the panels hold the log's numbers), and skipped with a note without matplotlib."""

from __future__ import annotations

import json
import sys

import pytest

from launcher.train.curves import CURVES, draw_curves, new_figure, write_curves

RECORDS = [
    {"kind": "train", "step": 1, "epoch": 0, "loss": 0.70, "lr": 1e-4, "samples": 8},
    {"kind": "train", "step": 2, "epoch": 0, "loss": 0.65, "lr": 2e-4, "samples": 8},
    {"kind": "eval", "step": 2, "epoch": 1, "loss": 0.66, "accuracy": 0.5, "f1": 0.25, "examples": 32},
    {"kind": "train", "step": 3, "epoch": 1, "loss": 0.60, "lr": 1e-4, "samples": 8},
    {"kind": "train", "step": 4, "epoch": 1, "loss": 0.50, "lr": 0.0, "samples": 8},
    {"kind": "eval", "step": 4, "epoch": 2, "loss": 0.55, "accuracy": 0.75, "f1": 0.7, "examples": 32},
]


def write_log(folder, records):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_png_is_written_beside_the_metrics_log(tmp_path):
    pytest.importorskip("matplotlib")
    write_log(tmp_path, RECORDS)
    path = write_curves(tmp_path)
    assert path == tmp_path / CURVES
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_each_panel_holds_the_logs_numbers():
    pytest.importorskip("matplotlib")
    figure = new_figure()
    draw_curves(figure, RECORDS)
    panels = {axes.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}
              for axes in figure.axes}
    assert panels["loss"] == {"train": ([1, 2, 3, 4], [0.70, 0.65, 0.60, 0.50]), "eval": ([2, 4], [0.66, 0.55])}
    assert list(panels["learning rate"].values()) == [([1, 2, 3, 4], [1e-4, 2e-4, 1e-4, 0.0])]
    assert panels["eval metrics"] == {"accuracy": ([2, 4], [0.5, 0.75]), "f1": ([2, 4], [0.25, 0.7])}


def test_without_matplotlib_no_png_and_a_one_line_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    write_log(tmp_path, RECORDS)
    assert write_curves(tmp_path) is None
    assert capsys.readouterr().out == "note: curves.png not drawn: matplotlib is not installed (pip install matplotlib)\n"
    assert not (tmp_path / CURVES).exists()
