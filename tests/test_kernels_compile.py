"""Every kernel, in the variants the engine launches at SD1.5's shapes, compiles for Hopper (sm_90) with the installed
Triton, without a GPU. The interpreter runs kernels as Python and accepts code the compiler refuses (a module-level
float read inside a kernel, a tl.dot tile under 16); this is the check that the compiler accepts them too. The
compilation runs in a child process without TRITON_INTERPRET (see kernel_compile.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_compile import CASES


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"kernel_compile.py failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_hopper(compiled, case):
    result = compiled[case]
    assert result["error"] is None, f"{case} does not compile for sm_90: {result['error']}"
    if case.startswith("attention-fp16"):
        # The ALIGN argument is what lets a head stride of 40 or 80 elements load 16 bytes at a time.
        assert result["narrow_loads"] == 0, f"{case}: {result['narrow_loads']} two-byte global loads, not 16-byte ones"
    if case.startswith("group_norm-fp16") and "-cl-" in case:
        # channels_last GroupNorm reads whole pixels: rows of channels, never a 2-byte element at a time.
        assert result["narrow_loads"] == 0, f"{case}: {result['narrow_loads']} two-byte global loads"
