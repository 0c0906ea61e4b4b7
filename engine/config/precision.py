"""What each ``train.dtype`` means in torch dtypes: the one place a precision's name becomes dtypes."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Precision(NamedTuple):
    params: torch.dtype  # the parameters the model computes with (fp32 masters live in the optimizer)
    compute: Optional[torch.dtype]  # autocast's dtype; None: no autocast, each op in its inputs' dtype
    activations: torch.dtype  # hidden states between pipeline stages, and the LM head's matmul


PRECISIONS = {
    "fp32": Precision(params=torch.float32, compute=None, activations=torch.float32),
    "bf16": Precision(params=torch.bfloat16, compute=torch.bfloat16, activations=torch.bfloat16),
}
# Gradients reduced over data parallel (optim.grad_reduce_dtype).
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
