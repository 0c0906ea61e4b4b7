"""The Triton kernels compile for real GPUs, with no GPU here: tools/kernel_report.py compiles each
variant the dispatch can pick through the JIT's own argument binding, for sm_80, sm_86 and sm_90, and
--check fails on a kernel that does not compile, exceeds a target's shared memory, or spills where
kernel_report.NO_SPILL forbids it (fp32 anywhere; fp16/bf16 at head dims 64, 72, 96, 128).

The compiles run in a fresh process: this one has TRITON_INTERPRET set, and the kernels are decorated
as interpreted functions once imported. They land in Triton's cache, so a second run is quick.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "loom.tools.kernel_report", "--check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_few_variants_compile_for_sm90():
    """Each kernel at the two hardest spots (bf16 at SigLIP's head dim 72, fp32 at 128), for one target."""
    res = _report("--quick", "--targets", "sm_90", timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "6 variant x target pairs" in res.stdout and ", 0 problems (" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_86", "sm_90"])
def test_every_variant_compiles_fits_and_does_not_spill(target):
    """All 432 variants (324 distinct compiles) for one target: minutes on 2 cores (about 8 when they are
    shared), seconds once Triton's cache holds them."""
    res = _report("--targets", target, timeout=1500)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
    assert ", 0 problems (" in res.stdout
