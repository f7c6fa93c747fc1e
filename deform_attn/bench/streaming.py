"""The cost of one more token: streaming causal deformable attention against its alternatives.

``python -m deform_attn.bench.streaming --lengths 256,1024,4096 --out DIR`` times, after a prefix
of ``n`` tokens, the work that one new token costs, three ways, side by side in one process:

* **stream**: :meth:`deform_attn.streaming.CausalStream.step` on one token (its cache holds the
  keys of the prefix);
* **recompute**: the causal layer's full forward pass over ``n + 1`` tokens, what a model without
  a cache would run for every new token;
* **full_kv_cache**: causal full attention of the same width with a key/value cache: project the
  token, append its key and value, attend with one query to ``n + 1`` keys, project out.

Each is timed ``--repeats`` times (median, min, max of the per-token seconds) after
``--warmup`` untimed calls, in eval mode under ``torch.no_grad()``. Writes ``results.csv`` and
``meta.json`` (command, settings, environment with the commit).

Axis letters: b batch, h heads, n tokens, d channels per head.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..attention import DeformableAttention1D
from ..baselines import FullAttention1D
from ..provenance import environment
from ..streaming import CausalStream

__all__ = ["measure", "main", "STREAMING_CASES"]

STREAMING_CASES: tuple[str, ...] = ("stream", "recompute", "full_kv_cache")


def _time(call: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure(length: int, *, dim: int, heads: int, dim_head: int, downsample: int, repeats: int, warmup: int) -> list[dict]:
    """Per-token seconds of each case after a prefix of ``length`` tokens (batch 1)."""
    torch.manual_seed(0)
    layer = DeformableAttention1D(dim=dim, heads=heads, dim_head=dim_head, downsample_factor=downsample, causal=True).eval()
    full = FullAttention1D(dim=dim, heads=heads, dim_head=dim_head, causal=True).eval()
    steps = warmup + repeats
    x = torch.randn(1, dim, length + steps)
    rows = []
    with torch.no_grad():
        stream = CausalStream(layer, batch_size=1)
        for start in range(0, length, 256):  # the prefix, fed in chunks
            stream.step(x[..., start : min(start + 256, length)])
        position = iter(range(length, length + steps))
        seconds = _time(lambda: stream.step(x[..., (i := next(position)) : i + 1]), repeats, warmup)
        rows.append(("stream", seconds))
        rows.append(("recompute", _time(lambda: layer(x[..., : length + 1]), repeats, warmup)))

        # causal full attention with a key/value cache of capacity length + steps
        tokens = x[0].T  # (n, dim)
        q_all, k_all, v_all = full.to_qkv(tokens).view(-1, 3, heads, dim_head).permute(1, 2, 0, 3)  # (h, n, d)
        keys, values = torch.zeros_like(k_all), torch.zeros_like(v_all)
        keys[:, :length], values[:, :length] = k_all[:, :length], v_all[:, :length]
        cursor = iter(range(length, length + steps))

        def one_token() -> torch.Tensor:
            i = next(cursor)
            q, k, v = full.to_qkv(tokens[i : i + 1]).view(1, 3, heads, dim_head).permute(1, 2, 0, 3)  # (h, 1, d)
            keys[:, i : i + 1], values[:, i : i + 1] = k, v
            out = F.scaled_dot_product_attention(q, keys[:, : i + 1], values[:, : i + 1])  # (h, 1, d)
            return full.to_out(out.transpose(0, 1).reshape(1, heads * dim_head))

        rows.append(("full_kv_cache", _time(one_token, repeats, warmup)))
    return [
        {"case": case, "n": length, "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
         "repeats": repeats, "dim": dim, "heads": heads, "dim_head": dim_head, "downsample": downsample,
         "threads": torch.get_num_threads()}
        for case, s in rows
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deform_attn.bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096", help="comma-separated prefix lengths n")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=32)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        lengths = [int(part) for part in args.lengths.split(",")]
        if any(n < args.downsample for n in lengths) or args.repeats < 1 or args.warmup < 0:
            raise ValueError
    except ValueError:
        parser.error(f"--lengths/--repeats/--warmup: expected integers n >= downsample, repeats >= 1, got {args.lengths!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for length in lengths:
        rows += measure(length, dim=args.dim, heads=args.heads, dim_head=args.dim_head, downsample=args.downsample,
                        repeats=args.repeats, warmup=args.warmup)
        print(" ".join(f"{row['case']} n={length}: {row['median_s'] * 1e3:.3f} ms/token" for row in rows[-3:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    command = shlex.join(["python", "-m", "deform_attn.bench.streaming", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": command, "environment": environment("cpu"), "cases": list(STREAMING_CASES)}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
