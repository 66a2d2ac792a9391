"""Interleaved timing for the benchmarks: every side runs once per round, so a busy moment of the machine
hits all sides alike, and the report is the median of each side and the ratios to the first side."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict


def interleaved_medians(sides: Dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5) -> Dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds (after ``warmup`` rounds), side by side."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: Dict[str, list] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def pin_to_cores(count: int) -> None:
    """Run this process's threads started from now on on ``count`` of the cores it may use. MindSpore's thread
    pools do not all follow its thread setting (its MatMul used a second core at ``threads_num(1)``, and so did its
    convolution in some runs), so a comparison at n threads holds every side to the same n cores. Call it before
    MindSpore or torch start their threads."""
    cores = sorted(os.sched_getaffinity(0))
    if count < len(cores):
        os.sched_setaffinity(0, cores[:count])


def report(medians: Dict[str, float], unit: str = "s") -> str:
    """One line: each side's median and its ratio to the first side."""
    first = next(iter(medians.values()))
    return "  ".join(f"{name} {value:.4f} {unit} ({value / first:.2f}x)" for name, value in medians.items())
