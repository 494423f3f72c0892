"""What a benchmark ran on, for the README's performance tables."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}"


def pool_row(label: str, plain: float, pool: float, steady: float | None, actors: int) -> str:
    """A Markdown row of an actor-pool benchmark: images/s of the plain loop, of the pool end to end
    (start-up included) and steady (from its first result), and both ratios."""
    steady = steady or float("nan")
    return f"| {label} | {plain:.2f} | {pool:.2f} | {steady:.2f} | {actors} | {pool / plain:.2f}, {steady / plain:.2f} |"
