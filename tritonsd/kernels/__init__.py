"""tritonsd's Triton kernels. Each op dispatches (see `dispatch`) between its kernel and a plain PyTorch reference."""

# Every op is a module of its name holding the @triton.jit kernel(s), `<Op>Plan` and `plan(...)` (tiles for a launch),
# `_check_inputs`, the launcher `<op>_triton`, the reference `<op>_ref` and the dispatcher `<op>`.
OPS = ("attention", "group_norm", "guided_step", "geglu", "layer_norm")

from .attention import attention, attention_ref
from .dispatch import backend, current_mode, use_triton
from .geglu import geglu, geglu_ref
from .group_norm import group_norm, group_norm_ref
from .guided_step import guided_step, guided_step_ref
from .layer_norm import layer_norm, layer_norm_ref

__all__ = [
    "OPS",
    "attention", "attention_ref", "group_norm", "group_norm_ref", "guided_step", "guided_step_ref", "geglu", "geglu_ref",
    "layer_norm", "layer_norm_ref",
    "backend", "current_mode", "use_triton",
]
