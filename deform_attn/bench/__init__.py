"""Benchmark command: time and peak memory of five attention layers against sequence length.

``python -m deform_attn.bench`` (or the console script ``deform-attn-bench``) measures, for each
sequence length ``n``, the forward time, the forward + backward time and the peak memory of

* **a** ``deformable_attention.DeformableAttention1D`` 0.0.20, the reference (only where that
  package is installed, and only at lengths where its estimated memory fits, see
  :func:`lucidrains_peak_bytes`);
* **b** ``deform_attn.from_lucidrains(a)``: this package in the reference's geometry, with the
  same weights as **a** (built from the same seed even where **a** itself is skipped);
* **c** ``deform_attn.DeformableAttention1D`` with its defaults (centred geometry, fast paths);
* **d** full multi-head attention of the same width,
  :class:`deform_attn.baselines.FullAttention1D`;
* **e** case **c** on the SDPA kernel: the bias materialised chunk by chunk and passed to
  ``scaled_dot_product_attention``, the layer's path before the piecewise kernel (on a GPU,
  **c** already takes this path). Not in the default ``--cases``.

Outputs in ``--out``: ``results.csv`` (one row per case x n x mode), ``meta.json`` (environment,
commands, parity of **b** against **a**, memory limit) and ``results.png`` (time and peak memory
against ``n``, log-log; solid forward + backward, dashed forward). A rerun into the same folder
skips every row already present with the same settings (so an interrupted run continues);
``--force`` measures them again. ``--plot-only DIR`` redraws the plot and the table.

Modules, one job each:

* :mod:`.cases`: the cases and modes, the layer of each case, parity of **b** against **a**;
* :mod:`.memory`: the memory limit, the reference's estimate, the peak-memory probes (and the
  method on each device);
* :mod:`.worker`: one measurement in a fresh process (the protocol);
* :mod:`.store`: ``results.csv`` and ``meta.json``, the resume key, old and new meta keys;
* :mod:`.plot`: the table and the figure;
* :mod:`.cli`: the arguments and the run loop, :func:`main`.
"""

from ..baselines import FullAttention1D
from .cases import CASES, MODES
from .cli import main, parse_lengths
from .memory import lucidrains_peak_bytes, memory_limit_bytes
from .plot import draw_results, format_table, plot_results
from .store import CSV_COLUMNS, SETTING_COLUMNS, read_meta, read_results

__all__ = [
    "CASES",
    "MODES",
    "CSV_COLUMNS",
    "SETTING_COLUMNS",
    "FullAttention1D",
    "lucidrains_peak_bytes",
    "memory_limit_bytes",
    "parse_lengths",
    "read_results",
    "read_meta",
    "draw_results",
    "plot_results",
    "format_table",
    "main",
]
