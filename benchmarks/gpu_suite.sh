#!/usr/bin/env bash
# ember's GPU suite on one GPU, in under 8 minutes: every recipe in fp32 / bf16 / fp16 + GradScaler /
# compile, GPT-2 small's MFU, the loop's overhead ratio on CUDA, and `ember plan` against measured
# peak memory, into one JSON of figures. The logic and the list of checks: benchmarks/gpu_suite.py.
#
#   benchmarks/gpu_suite.sh                        # writes gpu_suite.json (and gpu_suite-logs/)
#   benchmarks/gpu_suite.sh --out figures.json --only gpt2_mfu,plan_memory
#   benchmarks/gpu_suite.sh --smoke --out /tmp/smoke.json    # on the CPU, in under a minute
#
# Uses .venv/bin/python when there is one (else $PYTHON, else python3); the exit status is 0 when no
# check failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/benchmarks/gpu_suite.py" "$@"
