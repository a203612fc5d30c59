"""Test-session setup shared by all tests."""
import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; it must be chosen before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
