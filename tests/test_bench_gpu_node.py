"""bench.gpu_node's whole path on the CPU with a small OPT: built from its config, loaded int8
through the server's loader, serving a mixed batch of 8 adapters while a job trains through the
engine. (On a GPU the same script measures the 6.7B case; see the README.)"""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_node_bench_serves_and_trains_a_small_opt_on_one_copy():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_node", "--size", "small", "--device", "cpu",
                           "--train-steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["dtype_errors"] == []
    assert result["train_steps_done"] == 2 and result["training_items"] > 2
    assert result["batches_served_while_training"] >= 1 and result["outputs_while_training_equal_alone"]
    assert result["serving_peak_gb"] > 0 and result["serving_while_training_peak_gb"] > 0
