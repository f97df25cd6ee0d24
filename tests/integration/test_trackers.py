"""Trackers: `output.report_to` names every tracker Accelerate supports, a named one that is missing is refused,
and MLflow, run for real against a local file store (no server, no network), holds exactly the numbers of
metrics.jsonl."""

from __future__ import annotations

from typing import get_args

import pytest
from accelerate.utils import LoggerType

import launcher.train.reporting as reporting
from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from launcher.recipe.loading import RecipeError
from launcher.recipe.schema import OutputSection
from launcher.train.reporting import TRACKER_PACKAGES, read_metrics_log, tracker_for


def test_every_accelerate_tracker_can_be_named():
    named = set(get_args(OutputSection.model_fields["report_to"].annotation)) - {"auto", "none"}
    assert named == {str(tracker) for tracker in LoggerType} - {"all"} == set(TRACKER_PACKAGES)


def test_a_named_tracker_that_is_not_installed_is_refused(monkeypatch):
    """Accelerate drops a tracker it cannot import without a word; the run would log nowhere."""
    monkeypatch.setattr(reporting, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    assert tracker_for("tensorboard") == "tensorboard" and tracker_for("none") is None
    with pytest.raises(RecipeError, match=r"comet_ml: the tracker is not installed here \(pip install comet-ml\)"):
        tracker_for("comet_ml")


def logged_numbers(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What `RunReporter.log` sends a tracker: each number of each record as `kind/name` at the record's step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                series.setdefault(f"{record['kind']}/{key}", []).append((record["step"], float(value)))
    return series


def test_mlflow_offline_holds_the_numbers_of_the_metrics_log(assets, tmp_path, monkeypatch):
    mlflow_tracking = pytest.importorskip("mlflow.tracking", reason="the test extra installs mlflow-skinny")
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # a local file store: no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.17 refuses its file store without it
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # it would try to reach the network
    recipe = tiny_recipe(assets, tmp_path / "run", output={"report_to": "mlflow"}, training={"epochs": 1})
    assert run_in_process(write_recipe(tmp_path / "recipe.yaml", recipe)) == 0

    client = mlflow_tracking.MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "launcher"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    logged = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}
    expected = logged_numbers(read_metrics_log(tmp_path / "run"))
    assert len(expected["train/loss"]) == 8 and {"eval/loss", "eval/accuracy", "eval/f1"} <= set(expected)
    assert logged == expected
