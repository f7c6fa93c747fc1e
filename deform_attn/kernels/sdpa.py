"""Biased attention through ``scaled_dot_product_attention``, the bias materialised per chunk.

The portable kernel: any device, any dtype, attention dropout, and double backward when the bias
function supports it. The (queries x keys) bias exists one chunk of queries at a time; under
autograd each chunk is recomputed in the backward pass (activation checkpointing) instead of
stored, so memory stays near one chunk's worth.

Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, c queries of one
chunk, m keys, d channels per head.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["BiasFunction", "sdpa_biased_attention", "padding_bias"]

# distances (b g, c, m) -> bias (b g, c, m, o)
BiasFunction = Callable[[Tensor], Tensor]


def padding_bias(key_padding: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, m) bool, True where a key does not exist -> (b, 1, 1, m) additive bias: 0 or -inf."""
    bias = torch.zeros(key_padding.shape, dtype=dtype, device=key_padding.device)
    return bias.masked_fill(key_padding, -math.inf)[:, None, None, :]


def _attend_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_coordinates: Tensor,
    key_coordinates: Tensor,
    position_bias: BiasFunction | None,
    key_padding: Tensor | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Attention of one chunk of queries (b, h, c, d) to all keys."""
    batch = q.shape[0]
    bias = None
    if position_bias is not None:
        distances = query_coordinates[None, :, None] - key_coordinates[:, None, :]  # (b g, c, m)
        # shape: (b g, c, m, o) -> (b, g o, c, m): head = group * heads_per_group + o
        bias = rearrange(position_bias(distances), "(b g) c m o -> b (g o) c m", b=batch).to(q.dtype)
    if key_padding is not None:
        padding = padding_bias(key_padding, q.dtype)
        bias = padding if bias is None else bias + padding
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def sdpa_biased_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_coordinates: Tensor,
    key_coordinates: Tensor,
    position_bias: BiasFunction | None,
    scale: float,
    chunk: int,
    key_padding: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` with ``bias[h, i, j] = position_bias(u_i - w_j)``.

    Args:
        q: (b, h, n, d) queries.
        k, v: (b, h, m, d) keys and values.
        query_coordinates: (n,) query coordinates :math:`u_i`.
        key_coordinates: (b g, m) key coordinates :math:`w_j` per offset group.
        position_bias: maps distances (b g, c, m) to biases (b g, c, m, h / g), e.g.
            :class:`deform_attn.ContinuousPositionBias` with a table bound; ``None``: no bias.
        scale: factor on ``q k^T``.
        chunk: queries per chunk (``>= n``: one call).
        key_padding: optional (b, m) bool, True where a key does not exist.
        dropout_p: dropout on the attention weights.

    Returns:
        (b, h, n, d).
    """
    length = q.shape[2]
    if chunk >= length:
        return _attend_chunk(q, k, v, query_coordinates, key_coordinates, position_bias, key_padding, scale, dropout_p)
    # recompute each chunk in the backward pass rather than store its (c x m) tensors
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, key_coordinates))
    outputs = []
    for start in range(0, length, chunk):
        stop = start + chunk
        chunk_arguments = (
            q[:, :, start:stop], k, v, query_coordinates[start:stop], key_coordinates, position_bias, key_padding,
            scale, dropout_p,
        )
        if needs_graph:
            outputs.append(checkpoint(_attend_chunk, *chunk_arguments, use_reentrant=False))
        else:
            outputs.append(_attend_chunk(*chunk_arguments))
    return torch.cat(outputs, dim=2)
