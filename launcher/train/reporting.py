"""What a run tells the user while it runs: a progress bar, a JSONL metrics log, and Accelerate trackers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from tqdm.auto import tqdm

from launcher.recipe.loading import RecipeError

METRICS_LOG = "metrics.jsonl"
# Accelerate's trackers, each with the package that provides it.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "comet_ml": "comet-ml", "aim": "aim",
    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}


def tracker_for(report_to: str) -> Optional[str]:
    """The Accelerate tracker `output.report_to` names (`auto`: TensorBoard when it is installed; `none`: no tracker).
    A named tracker that is not installed is refused: Accelerate would drop it without a word."""
    if report_to == "none" or (report_to == "auto" and not importlib.util.find_spec("tensorboard")):
        return None
    name = "tensorboard" if report_to == "auto" else report_to
    if name not in {str(tracker) for tracker in get_available_trackers()}:
        package = TRACKER_PACKAGES[name]
        raise RecipeError("output.report_to", [f"{name}: the tracker is not installed here (pip install {package}), or set it to none"])
    return name


class RunReporter:
    """Main-process progress bar and log; every record also goes to the tracker when there is one."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, total_steps: int, first_step: int):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.log_path = Path(run_dir) / METRICS_LOG
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not self.enabled, desc="training", unit="step")

    def advance(self, loss: Optional[float], lr: float, samples_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}", refresh=False)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One JSONL record `{"kind", "step", ...values}`; numbers also go to the tracker as `kind/name`."""
        if self.enabled:
            record = {"kind": kind, "step": step, **values}
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if kind == "eval":
                self.bar.write(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float)))
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        self.bar.close()


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics log, in order."""
    path = Path(run_dir) / METRICS_LOG
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
