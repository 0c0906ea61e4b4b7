#!/usr/bin/env bash
# Install Loom with its test extras, then run the test suite. Extra arguments go to pytest,
# e.g. `bash tests/run.sh -m "not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch==2.13.0 first: on a CPU machine it resolves to the CPU build, never a multi-GB CUDA one. The test
# extra (megatron-core among others) then finds torch satisfied, and pip keeps it rather than upgrading.
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[test]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec python -m pytest "$@"
