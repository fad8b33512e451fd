"""tritonsd's Triton kernels. Each op dispatches (see `dispatch`) between its kernel and a plain PyTorch reference."""

from .attention import attention, attention_ref
from .dispatch import backend, use_triton
from .group_norm import group_norm, group_norm_ref
from .guided_step import guided_step, guided_step_ref

__all__ = [
    "attention", "attention_ref", "group_norm", "group_norm_ref", "guided_step", "guided_step_ref",
    "backend", "use_triton",
]
