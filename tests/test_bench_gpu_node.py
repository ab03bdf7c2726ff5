"""bench.gpu_node's whole path on the CPU with a small OPT: written layer by layer as a Hugging
Face folder, loaded int8 through the server's loader, the engine built as the server builds it
(the memory plan sizes its pool), serving 32 adapters of both kinds while a job trains through the
engine. (On a GPU the same script measures the 6.7B and 8B cases: bench/gpu_check.sh.)"""

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
    assert result["memory_plan"]["kv_cache_tokens"] > 0 and result["memory_plan"]["basis"].startswith("CPU_MEMORY")
    assert result["serving_tok_s_alone"] > 0 and result["peak_gib"] > 0
