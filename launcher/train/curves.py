"""`curves.png` beside a run's metrics.jsonl: training loss, learning rate and evaluation metrics against optimizer
steps, for a look at a finished run without a tracker.

matplotlib comes with the `bench` extra, not with the launcher: without it no figure is drawn and the run says so in
one line. Figures are drawn on a plain `matplotlib.figure.Figure`, which needs no display and leaves pyplot's global
backend alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launcher.train.reporting import read_metrics_log

CURVES = "curves.png"
NO_MATPLOTLIB = "matplotlib is not installed (pip install matplotlib)"


def new_figure(**options: Any) -> Optional[Any]:
    """A matplotlib `Figure`, or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(layout="constrained", **options)


def eval_metric_names(evaluations: list[dict[str, Any]]) -> list[str]:
    """The fractional metrics of the eval records (accuracy, f1, ...): floats other than the loss."""
    return sorted({k for record in evaluations for k, v in record.items() if isinstance(v, float) and k != "loss"})


def draw_curves(figure: Any, records: list[dict[str, Any]]) -> None:
    """Three panels: train (and eval) loss, learning rate, eval metrics; x is the optimizer step."""
    train = [r for r in records if r["kind"] == "train"]
    evaluations = [r for r in records if r["kind"] == "eval"]
    loss, lr, metrics = figure.subplots(1, 3)
    loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    loss.plot([r["step"] for r in evaluations], [r["loss"] for r in evaluations], "o-", label="eval")
    lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    for name in eval_metric_names(evaluations):
        measured = [r for r in evaluations if name in r]
        metrics.plot([r["step"] for r in measured], [r[name] for r in measured], "o-", label=name)
    for axes, title in ((loss, "loss"), (lr, "learning rate"), (metrics, "eval metrics")):
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)


def write_curves(run_dir: str | Path) -> Optional[Path]:
    """Draw `<run_dir>/curves.png` from `<run_dir>/metrics.jsonl`; its path, or None after a one-line note when
    matplotlib is missing. Call it on the main process once the log is complete."""
    figure = new_figure(figsize=(13, 3.6))
    if figure is None:
        print(f"note: {CURVES} not drawn: {NO_MATPLOTLIB}")
        return None
    draw_curves(figure, read_metrics_log(run_dir))
    path = Path(run_dir) / CURVES
    figure.savefig(path, dpi=110)
    return path
