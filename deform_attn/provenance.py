"""Where a recorded number came from: the commit, the machine and the software.

The benchmark (:mod:`deform_attn.bench`) and the ablation runner (:mod:`deform_attn.experiments`)
both stamp their records with :func:`environment`, so a benchmark row and a training record name
their commit and environment with the same keys and the same conventions.

A commit is 40 hex digits, with the suffix ``-dirty`` when tracked files differ from it (an
untracked file does not make a checkout dirty). ``None`` means "not run from a git checkout"
(e.g. an installed wheel).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["DIRTY_SUFFIX", "git_commit", "is_dirty_commit", "cpu_model", "environment"]

DIRTY_SUFFIX = "-dirty"
_PACKAGE_ROOT = Path(__file__).resolve().parent


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit checked out at ``path`` (default: this package's checkout), ``-dirty`` if modified.

    Returns ``None`` outside a git checkout or where git is missing.
    """
    where = Path(path) if path is not None else _PACKAGE_ROOT
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + (DIRTY_SUFFIX if changes else "")


def is_dirty_commit(commit: str | None) -> bool:
    """Whether a recorded commit names a modified checkout (or none at all)."""
    return commit is None or commit.endswith(DIRTY_SUFFIX) or commit.endswith("+dirty")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu", *, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The software and machine a measurement ran on.

    Keys: ``device``, ``device_name`` (the GPU's name, or the CPU model), ``cpu_model``,
    ``cpu_count``, ``threads`` (torch intra-op threads), ``torch``, ``cuda``, ``python``,
    ``platform``, ``deform_attn`` (package version) and ``git_commit`` (see :func:`git_commit`).
    """
    from . import __version__

    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_model()
    return {
        "device": str(device),
        "device_name": device_name,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "deform_attn": __version__,
        "git_commit": git_commit(path),
    }
