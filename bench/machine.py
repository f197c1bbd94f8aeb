"""What machine a benchmark ran on, for its JSON: the same code ran 1.6–2.4× apart on boxes of one size
(docs/benchmarks.md), so a figure without its CPU cannot be compared with another."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# the CPU features a figure depends on: bfloat16 products (trainer: logits_precision "auto"), wide vectors
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def describe() -> dict[str, object]:
    """CPU model and count, the flags above it has, platform and Python."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        model = platform.processor()
    return {"cpu": model, "cpus": os.cpu_count(), "flags": [f for f in FLAGS if f in flags],
            "platform": platform.platform(), "python": platform.python_version()}
