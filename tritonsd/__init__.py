"""tritonsd: Stable Diffusion inference with its own Triton kernels.

    from tritonsd import Pipeline
    pipe = Pipeline.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.float16)
    pipe.txt2img("a lighthouse at dusk", seed=1)[0].save("out.png")
"""

import importlib

# Imported on first use, so that `import tritonsd.cli` reaches the command's own handling of Ctrl-C before torch loads.
_EXPORTS = {
    "CheckpointError": "tritonsd.loader",
    "ModelConfig": "tritonsd.engine.config",
    "NonFiniteError": "tritonsd.engine.pipeline",
    "Pipeline": "tritonsd.engine.pipeline",
    "SettingError": "tritonsd.engine.settings",
    "Settings": "tritonsd.engine.settings",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tritonsd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
