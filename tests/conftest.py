import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be switched on before
# triton is first imported. On a GPU machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
