"""Every kernel, in the variants the engine launches at SD 1.5's and SD 2.x's shapes, compiles for Hopper (sm_90) with
the installed Triton, without a GPU. The interpreter runs kernels as Python and accepts code the compiler refuses (a
module-level float read inside a kernel, a tl.dot tile under 16); this is the check that the compiler accepts them too.
The compilation runs in a child process without TRITON_INTERPRET (see kernel_compile.py)."""

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
    if case.startswith("layer_norm-fp16"):
        assert result["narrow_loads"] == 0, f"{case}: {result['narrow_loads']} two-byte global loads"
    if case.startswith("group_norm-fp16") and "-cl-" in case:
        # channels_last GroupNorm reads whole pixels: rows of channels, never a 2-byte element at a time.
        assert result["narrow_loads"] == 0, f"{case}: {result['narrow_loads']} two-byte global loads"


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("attention-fp16", "attention-bf16"))])
def test_attention_tensor_cores_multiply_only_the_head_dim(compiled, case):
    """Tile sides are powers of two; SD's head dims 40, 80 and 160 are not. Padded to 64, 128 and 256, a third of
    the tensor-core work would multiply zeros: the kernel splits the head dim instead, so the work covers it rounded
    up to the 16-column step of an MMA instruction."""
    d = int(case.split("-")[2][1:])
    result = compiled[case]
    cfg = result["plan"]  # the compiling process's, which sees the GPU tiles, not the interpreter's
    # Per warp group and key block: q k^T is BLOCK_N wide over the head dim, p v is the head dim wide over BLOCK_N.
    # A program's 64-row instructions repeat BLOCK_M / 64 times over num_warps / 4 warp groups.
    per_column = 2 * cfg["block_n"] * (cfg["block_m"] // 64) // (cfg["num_warps"] // 4)
    columns = result["mma_nk"] / per_column
    assert columns == -(-d // 16) * 16, f"{case}: tensor cores multiply {columns:g} head-dim columns for D = {d}"
