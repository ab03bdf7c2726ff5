#!/usr/bin/env bash
# The GPU proof, in one run of under 9 minutes on one NVIDIA GPU: the tests of the CUDA path with
# DEVICE=cuda (the random load over every legal request shape included), then bench.gpu_node on an
# OPT-6.7B-shaped and a Llama-3-8B-shaped model, each under a 12 GiB cap (a consumer card), on the
# server's default settings. The last line is one JSON object.
#
#     bench/gpu_check.sh            (after `make install` on the GPU machine: it picks the CUDA torch)
#     PYTHON=/path/to/python bench/gpu_check.sh
#     GPU_CHECK_LOGS=/abs/folder bench/gpu_check.sh    (keeps the test log, junit XML and bench logs)
#
# Without .venv it runs the python3 on the PATH. Where the packaged models (the default and SmolLM2)
# can be neither found nor converted (a bare machine without their PyPI packages), the real-model
# tests are left out and the JSON says so. On a machine without a GPU it says so in its JSON and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WORK=${GPU_CHECK_LOGS:-$(mktemp -d)}
mkdir -p "$WORK"
[ -n "${GPU_CHECK_LOGS:-}" ] || trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo '{"gpu": null, "error": "no CUDA device visible to torch (run make install on the GPU machine first)"}'
    exit 2
fi

# the random load's other node classes are the CPU's: only its gpu-path pass runs here
selection=(-k "not test_a_random_mix or gpu-path")
real_model=true
if ! { "$PYTHON" -m app.cli prepare-model && BASE_MODEL=smollm2-135m "$PYTHON" -m app.cli prepare-model; } \
        >"$WORK/prepare-model.log" 2>&1; then
    real_model=false  # the random load runs on the real model too
    selection=(-m "not real_model" -k "not test_a_random_mix")
    echo "no packaged default model here: the real-model tests are left out" >&2
fi
echo "CUDA-path tests with DEVICE=cuda..." >&2
rm -f "$WORK/tests.xml"  # a kept folder's earlier report must not stand for this run
DEVICE=cuda timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" \
    tests/test_gpu_path.py tests/engine/test_memory_plan.py tests/engine/test_device.py tests/engine/test_transfers.py \
    tests/test_random_load.py "${selection[@]}" \
    >"$WORK/tests.log" 2>&1
tests_rc=$?
tail -5 "$WORK/tests.log" >&2

for size in 6.7b 8b; do
    echo "bench.gpu_node --size $size..." >&2
    timeout 150 "$PYTHON" -m bench.gpu_node --size "$size" --device cuda >"$WORK/$size.json" 2>"$WORK/$size.log"
    echo "{\"rc\": $?}" >>"$WORK/$size.json"
    tail -3 "$WORK/$size.log" >&2
done

"$PYTHON" - "$WORK" "$tests_rc" "$started" "$real_model" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
import torch
work, tests_rc, started, real_model = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "true"

def bench(size):
    lines = (work / f"{size}.json").read_text().strip().splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    rc = found[-1]["rc"]
    return (found[-2] | {"rc": rc}) if len(found) > 1 else {"rc": rc, "error": (work / f"{size}.log").read_text()[-2000:]}

suite = {"rc": tests_rc, "real_model_tests": real_model}
if (work / "tests.xml").exists():
    counts = ET.parse(work / "tests.xml").getroot().find("testsuite").attrib
    suite |= {key: int(counts[key]) for key in ("tests", "failures", "errors", "skipped")}
result = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__, "tests": suite,
          "opt_6_7b": bench("6.7b"), "llama_3_8b": bench("8b"), "seconds": int(time.time()) - started}
result["passed"] = tests_rc == 0 and all(result[k].get("target_met") for k in ("opt_6_7b", "llama_3_8b"))
print(json.dumps(result))
PY
