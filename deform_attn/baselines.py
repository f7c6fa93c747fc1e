"""Full and local multi-head attention: the baselines the deformable layer is measured against.

One class serves the benchmark (case **d**) and the ablations (the ``full`` and ``local``
variants), so that "full attention" means the same computation everywhere: a fused projection
to queries, keys and values, :func:`torch.nn.functional.scaled_dot_product_attention` (the fused
kernel when there is no mask), and a projection out.

Axis letters: b batch, h heads, n tokens, d channels per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FullAttention1D"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


class FullAttention1D(nn.Module):
    """Multi-head self-attention over every token (or a window of tokens).

    Args:
        dim: channels of the input and output.
        dim_head: channels per head.
        heads: attention heads.
        window: if given, each query attends only to keys within ``window`` tokens either side
            (local attention); ``None`` (default) attends to all tokens.
        batch_first: take and return (batch, n, dim) instead of (batch, dim, n), as
            :class:`deform_attn.DeformableAttention1D` does.
        causal: query ``i`` attends to keys ``0..i`` only (with ``window``: ``i - window..i``).

    Forward:
        x: (batch, dim, n), or (batch, n, dim) with ``batch_first``.
        mask: optional (batch, n) bool key-padding mask, True for real tokens. Padded keys get no
            weight; outputs at padded positions are zero.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, window: int | None = None,
                 batch_first: bool = False, causal: bool = False):
        super().__init__()
        dim, dim_head, heads = (_positive_int(n, v) for n, v in (("dim", dim), ("dim_head", dim_head), ("heads", heads)))
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"window: expected None or a non-negative number of tokens, got {window!r}")
        self.heads, self.window, self.batch_first, self.causal = heads, window, batch_first, causal
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.batch_first:
            x = x.transpose(1, 2)
        batch, length, _ = x.shape
        # shape: (b, n, 3 h d) -> 3 x (b, h, n, d); contiguous, or CPU SDPA runs up to 3x slower
        q, k, v = (t.contiguous() for t in self.to_qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4))
        allowed = None
        if mask is not None:
            allowed = mask[:, None, None, :]  # (b, 1, 1, n) keys
        if self.window is not None or (self.causal and allowed is not None):
            index = torch.arange(length, device=x.device)
            offset = index[:, None] - index[None, :]  # (n, n) query - key
            band = torch.ones_like(offset, dtype=torch.bool) if self.window is None else offset.abs() <= self.window
            if self.causal:
                band = band & (offset >= 0)
            allowed = band[None, None] if allowed is None else allowed & band[None, None]
        # no mask at all: the fused kernel's own causal path
        is_causal = self.causal and allowed is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal)
        out = self.to_out(out.transpose(1, 2).reshape(batch, length, -1))
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return out if self.batch_first else out.transpose(1, 2)
