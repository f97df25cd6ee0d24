"""The multi-machine rendezvous without Slurm: `accelerate launch --config_file accelerate_configs/multi_node.yaml
--num_machines 2` started twice on this machine, as machine ranks 0 and 1 (what one launch per node does on a
cluster), CPU processes over gloo on loopback. The two "machines" train the model one process trains at the same
global batch, within the tolerance of tests/integration/test_distributed_runs.py. The same options under Slurm:
tests/cluster/test_slurm_multi_node.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launching import TOLERANCE, assert_weights_close, free_port, train_losses
from recipes import write_run
from runs import REPO

pytestmark = pytest.mark.slow


def test_two_machine_launches_rendezvous_and_train_the_one_process_model(tmp_path, start_model, one_process):
    recipe = write_run(tmp_path, start_model, per_device=4, accumulation=1)
    port = str(free_port())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch",
                          "--config_file", "accelerate_configs/multi_node.yaml", "--num_machines", "2",
                          "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", port, "launcher/run.py", str(recipe)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-3000:]
    # The job's main process (machine rank 0) prints the plan, once: one group of 2 processes over 2 machines.
    assert "global batch : 8 = 4 per device x 1 accumulation x 2 process(es)" in outputs[0]
    assert "topology : 2 x cpu (DistributedType.MULTI_CPU)" in outputs[0]
    assert "global batch :" not in outputs[1]
    run_dir = tmp_path / "out"
    assert train_losses(run_dir) == pytest.approx(train_losses(one_process), rel=0, abs=TOLERANCE)
    assert_weights_close(run_dir / "model", one_process / "model")
