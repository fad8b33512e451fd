"""Triton is optional: without it, `import tritonsd` and the whole reference path work and the kernels are never
picked; asking for them is a clear error. Where the code leans on Triton internals, versions outside the tested range
are refused with one warning."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from tritonsd import kernels
from tritonsd.engine.pipeline import Pipeline
from tritonsd.kernels import compat, launch
from tiny import TINY, random_state, write_single_file

ARGS = dict(steps=2, width=32, height=32, seed=3, sampler="euler_a", output_type="np")

# Runs in a fresh interpreter where every `import triton` fails, as on a machine without it.
WITHOUT_TRITON = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import tritonsd
    from tritonsd import kernels
    from tritonsd.kernels import compat

    model, out = sys.argv[1], sys.argv[2]
    images = tritonsd.Pipeline.from_checkpoint(model).txt2img("a red circle", **json.loads(sys.argv[3]))
    np.save(out, images)
    try:
        with kernels.backend("triton"):
            kernels.geglu(torch.ones(2, 4))
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({"available": compat.AVAILABLE, "triton_modules": sorted(m for m in sys.modules if m.split(".")[0] == "triton"),
                      "triton_mode_error": error}))
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    path.with_suffix(".json").write_text(TINY.to_json())
    return path


def test_reference_path_runs_without_triton(model, tmp_path):
    out = tmp_path / "images.npy"
    # "auto" with the interpreter switched on: with Triton installed this would take the kernels.
    env = {**os.environ, "TRITONSD_KERNELS": "auto", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(model), str(out), json.dumps(ARGS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"txt2img without Triton failed:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["available"] is False and report["triton_modules"] == [], f"Triton was not hidden: {report}"
    assert report["triton_mode_error"] == (
        "kernel backend 'triton' requested, but Triton is not installed (pip install triton, on Linux); "
        "the PyTorch reference path runs without it"), f"asking for the kernels without Triton: {report}"

    with kernels.backend("torch"):
        want = Pipeline.from_checkpoint(model).txt2img("a red circle", **ARGS)
    got = np.load(out)
    err = np.abs(got - want).max()
    assert err <= 1e-6, f"without Triton the image differs from the reference path's by {err:.2e} (max abs)"


@pytest.mark.parametrize("version, tested", [("3.5.1", False), ("3.6.0", True), ("3.9.0", True), ("3.10.0", False),
                                             ("4.0.0+git1234", False)])
def test_precompile_uses_triton_internals_only_on_tested_versions(monkeypatch, version, tested):
    monkeypatch.setattr(compat.triton, "__version__", version)
    launch._internals_tested.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = launch._internals_tested(), launch._internals_tested()
    finally:
        launch._internals_tested.cache_clear()
    assert first is second is tested, f"Triton {version}: internals taken as tested={first}, expected {tested}"
    messages = [str(w.message) for w in caught]
    if tested:
        assert not messages, f"Triton {version} is in the tested range but warned: {messages}"
    else:
        assert messages == [
            f"Triton {version} is outside the tested range 3.6 to 3.9: kernels are not compiled ahead in parallel but "
            "one by one at their first launch"], f"Triton {version}: expected one warning, got {messages}"

