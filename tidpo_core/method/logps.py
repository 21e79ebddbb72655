"""Per-token log-probabilities from logits, and the dtype the method's arithmetic runs in.

Conventions (shared with the rest of tidpo_core): batches are right-padded and every per-token
tensor is position-aligned with ``input_ids``: entry ``t`` is about token ``input_ids[:, t]``
predicted from the tokens before it, so entry 0 is always 0. Only response tokens are scored;
``response_mask`` selects them and every sum is taken under it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 logits lose too much in logsumexp; float64 is kept so that gradcheck-style tests work.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token log-probabilities ``[B,T]``, position-aligned with ``input_ids`` (entry 0 is 0).

    Uses gathered logit minus logsumexp so that no ``[B,T,V]`` log-softmax is materialised.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B,T,V] and input_ids [B,T], got {tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    dtype = compute_dtype(logits)
    shifted = logits[:, :-1].to(dtype)
    targets = input_ids[:, 1:].long().unsqueeze(-1)
    picked = shifted.gather(-1, targets).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
    return F.pad(picked, (1, 0), value=0.0)
