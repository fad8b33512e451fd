"""tritonsd: Stable Diffusion inference with its own Triton kernels.

    from tritonsd import Pipeline
    pipe = Pipeline.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.float16)
    pipe.txt2img("a lighthouse at dusk", seed=1)[0].save("out.png")
"""

from tritonsd.engine.config import ModelConfig
from tritonsd.engine.pipeline import Pipeline
from tritonsd.loader import CheckpointError

__all__ = ["CheckpointError", "ModelConfig", "Pipeline"]
__version__ = "0.1.0"
