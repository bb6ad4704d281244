#!/usr/bin/env bash
# The GPU check, in one go (under 10 minutes on one CUDA device):
#   1. the CUDA tests (marker gpu): DP-SGD training and per-example clipping on the
#      device, the energy meter's NVML path;
#   2. `fedseal-sim bench dp --device cuda` at 1M and 10M parameters (variants
#      interleaved, median and min-max over repeats);
#   3. the figures, with the command, date and device, appended to
#      simulations/bench/RESULTS.md.
# Usage: bash simulations/bench/gpu_check.sh   (from a checkout with fedseal installed)
# Exit 2, with one line saying so, when no CUDA device is visible (3: torch missing): nothing is run.
set -euo pipefail
cd "$(dirname "$0")/../.."

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_HOME="${FLWR_HOME:-$(mktemp -d)}"
py="${PYTHON:-python}"

probe_rc=0
device="$("$py" -c 'import sys
try:
    import torch
except ImportError:
    sys.exit(3)
if not torch.cuda.is_available():
    sys.exit(2)
print(torch.cuda.get_device_name(0))' 2>/dev/null)" || probe_rc=$?
if [ "$probe_rc" -eq 3 ]; then
  echo "gpu_check: $py cannot import torch: install fedseal first (README, Quick start)" >&2
  exit 3
elif [ "$probe_rc" -ne 0 ]; then
  echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing run" >&2
  exit 2
fi
echo "gpu_check: $device" >&2

work="$(mktemp -d)"
started="$(date -u '+%Y-%m-%d %H:%M UTC')"
tests_rc=0
timeout 240 "$py" -m pytest -q -p no:cacheprovider -m gpu tests >"$work/tests.txt" 2>&1 || tests_rc=$?
tail -n 3 "$work/tests.txt" >&2
bench_cmd=(fedseal-sim bench dp --device cuda --params 1e6,1e7 --repeats 3)
bench_rc=0
timeout 300 "${bench_cmd[@]}" >"$work/bench.txt" 2>&1 || bench_rc=$?
cat "$work/bench.txt" >&2

{
  echo
  echo "## GPU check ($started, $device)"
  echo
  echo "Command: \`bash simulations/bench/gpu_check.sh\` (its steps: \`pytest -m gpu tests\`, \`${bench_cmd[*]}\`)."
  echo
  echo "CUDA tests (exit $tests_rc):"
  echo
  tail -n 3 "$work/tests.txt" | sed 's/^/    /'
  echo
  echo "\`bench dp\` on the device (exit $bench_rc):"
  echo
  sed 's/^/    /' "$work/bench.txt"
} >>simulations/bench/RESULTS.md
echo "gpu_check: figures appended to simulations/bench/RESULTS.md" >&2
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
