"""`launcher/run.py` that records, per rank, how the prepared model's parameters are held when training starts:
the evidence that FSDP2 really shards (each rank holds part of each weight as a DTensor) rather than training
replicas. Used by tests/test_fsdp2.py in place of run.py:

    accelerate launch --config_file accelerate_configs/fsdp2.yaml tests/support/shard_report.py RECIPE [overrides...]

Writes OUTPUT_DIR/shards/rank-N.json: {"local": elements this rank holds, "full": elements of the whole model,
"dtensor": whether every parameter is a DTensor}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch.distributed.tensor import DTensor  # noqa: E402

from launcher.train import loop  # noqa: E402
from launcher.run import main  # noqa: E402


def record_shards() -> None:
    train = loop.TrainingLoop.train

    def reporting_train(self):
        parameters = list(self.model.parameters())
        report = {
            "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters),
            "full": sum(p.numel() for p in parameters),
            "dtensor": all(isinstance(p, DTensor) for p in parameters),
        }
        folder = Path(self.recipe.output.dir) / "shards"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
        return train(self)

    loop.TrainingLoop.train = reporting_train


if __name__ == "__main__":
    record_shards()
    sys.exit(main(sys.argv[1:]))
