import os

import torch

# Without CUDA, the Triton kernels run in Triton's interpreter on CPU tensors.
# The switch is read when kernels are decorated, so it must be set before any
# kernel module is imported. The engine itself defaults to the PyTorch
# reference path in tests; tests that want the kernels ask for them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITONSD_KERNELS", "torch")
