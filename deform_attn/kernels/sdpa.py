r"""Biased attention through ``scaled_dot_product_attention``, the bias materialised per chunk.

The portable kernel: any device, any dtype, attention dropout, and double backward when the bias
function supports it. The (queries x keys) bias exists one chunk of queries at a time; under
autograd each chunk is recomputed in the backward pass (activation checkpointing) instead of
stored, so memory stays near one chunk's worth.

In causal mode a key is hidden from the queries before its ``visible_from`` (an additive
:math:`-\infty` in the chunk's bias), and null keys, appended to the keys and values with a zero
bias, are seen by every query.

Axis letters: b batch, g offset groups, o heads per group (h = g o), n queries, c queries of one
chunk, m keys, e null keys, d channels per head.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["BiasFunction", "sdpa_biased_attention", "padding_bias", "hidden_keys", "check_causal_arguments"]

# distances (b g, c, m) -> bias (b g, c, m, o)
BiasFunction = Callable[[Tensor], Tensor]


def padding_bias(key_padding: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, m) bool, True where a key does not exist -> (b, 1, 1, m) additive bias: 0 or -inf."""
    bias = torch.zeros(key_padding.shape, dtype=dtype, device=key_padding.device)
    return bias.masked_fill(key_padding, -math.inf)[:, None, None, :]


def hidden_keys(visible_from: Tensor, query_indices: Tensor, batch: int, heads: int) -> Tensor:
    """Causal visibility: (b g, m) first query that sees each key, (c,) query indices -> (b, h, c, m)
    bool, True where query ``i`` does not see key ``j`` yet (``i < visible_from``); head
    ``group * h / g + o`` uses group ``group``."""
    hidden = visible_from[:, None, :] > query_indices[:, None]  # (b g, c, m)
    groups = visible_from.shape[0] // batch
    return repeat(hidden, "(b g) c m -> b (g o) c m", b=batch, o=heads // groups)


def check_causal_arguments(
    q: Tensor, key_coordinates: Tensor, visible_from: Tensor | None, null_k: Tensor | None, null_v: Tensor | None
) -> None:
    """Raise ``ValueError`` naming the argument unless ``visible_from`` is None or (b g, m) int64
    and ``null_k``, ``null_v`` are both None or both (b, h, e, d) with ``e >= 1`` in ``q``'s dtype."""
    if visible_from is not None:
        expected = f"visible_from: expected an int64 tensor of shape (b g, m) = {tuple(key_coordinates.shape)}, got"
        if not isinstance(visible_from, Tensor):
            raise ValueError(f"{expected} {visible_from!r}")
        if visible_from.dtype != torch.int64 or visible_from.shape != key_coordinates.shape:
            raise ValueError(f"{expected} {visible_from.dtype} {tuple(visible_from.shape)}")
    if (null_k is None) != (null_v is None):
        missing = "null_v" if null_v is None else "null_k"
        raise ValueError(f"{missing}: expected a tensor, since null_k and null_v come together, got None")
    if null_k is None:
        return
    batch, heads, _, channels = q.shape
    for name, tensor in (("null_k", null_k), ("null_v", null_v)):
        if not isinstance(tensor, Tensor) or tensor.ndim != 4 or tensor.shape[:2] != (batch, heads) or (
            tensor.shape[3] != channels or tensor.shape[2] < 1
        ):
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else repr(tensor)
            raise ValueError(f"{name}: expected shape (b, h, e, d) = ({batch}, {heads}, e >= 1, {channels}), got {got}")
        if tensor.dtype != q.dtype:
            raise ValueError(f"{name}: expected the dtype of q, {q.dtype}, got {tensor.dtype}")
    if null_v.shape != null_k.shape:
        raise ValueError(f"null_v: expected the shape of null_k, {tuple(null_k.shape)}, got {tuple(null_v.shape)}")


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
    start: int = 0,
    visible_from: Tensor | None = None,
    null_keys: int = 0,
) -> Tensor:
    """Attention of one chunk of queries (b, h, c, d), from query ``start`` on, to all keys (b, h,
    m + e, d), the last ``null_keys`` of them null keys."""
    batch = q.shape[0]
    bias = None
    if position_bias is not None:
        distances = query_coordinates[None, :, None] - key_coordinates[:, None, :]  # (b g, c, m)
        # shape: (b g, c, m, o) -> (b, g o, c, m): head = group * heads_per_group + o
        bias = rearrange(position_bias(distances), "(b g) c m o -> b (g o) c m", b=batch).to(q.dtype)
    if key_padding is not None:
        padding = padding_bias(key_padding, q.dtype)
        bias = padding if bias is None else bias + padding
    if visible_from is not None:
        heads, width = q.shape[1:3]
        hidden = hidden_keys(visible_from, torch.arange(start, start + width, device=q.device), batch, heads)
        if bias is None:
            bias = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(hidden, -math.inf)  # broadcasts a (b, 1, 1, m) padding bias to (b, h, c, m)
    if null_keys and bias is not None:  # zero bias for the null keys: no position, always visible
        bias = F.pad(bias, (0, null_keys))
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
    visible_from: Tensor | None = None,
    null_k: Tensor | None = None,
    null_v: Tensor | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + bias) v`` with ``bias[h, i, j] = position_bias(u_i - w_j)``.

    With null keys, the softmax of every query runs over the m keys and then the e null keys,
    whose logits are ``q null_k^T * scale`` (no position bias, never hidden or padded), and the
    output is the weights times ``[v; null_v]``.

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
        visible_from: optional (b g, m) int64, causal visibility: query ``i`` sees key ``j`` of
            row ``r`` (sequence, offset group) iff ``i >= visible_from[r, j]`` (``<= 0``: every
            query, ``>= n``: none). Not differentiable. ``None``: every key is visible.
        null_k, null_v: optional (b, h, e, d) null keys and values, both or neither, seen by
            every query. Pass them whenever ``visible_from`` (with ``key_padding``) can hide every
            key from a query: a query that sees no key at all has an undefined output.

    Returns:
        (b, h, n, d).
    """
    check_causal_arguments(q, key_coordinates, visible_from, null_k, null_v)
    length = q.shape[2]
    null_keys = 0
    if null_k is not None:  # (b, h, m + e, d); k and v now carry null_k's and null_v's gradients
        k, v, null_keys = torch.cat([k, null_k], dim=2), torch.cat([v, null_v], dim=2), null_k.shape[2]
    if chunk >= length:
        return _attend_chunk(
            q, k, v, query_coordinates, key_coordinates, position_bias, key_padding, scale, dropout_p,
            visible_from=visible_from, null_keys=null_keys,
        )
    # recompute each chunk in the backward pass rather than store its (c x m) tensors
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, key_coordinates))
    outputs = []
    for start in range(0, length, chunk):
        stop = start + chunk
        chunk_arguments = (
            q[:, :, start:stop], k, v, query_coordinates[start:stop], key_coordinates, position_bias, key_padding,
            scale, dropout_p, start, visible_from, null_keys,
        )
        if needs_graph:
            outputs.append(checkpoint(_attend_chunk, *chunk_arguments, use_reentrant=False))
        else:
            outputs.append(_attend_chunk(*chunk_arguments))
    return torch.cat(outputs, dim=2)
