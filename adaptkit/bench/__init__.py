"""``adaptkit bench``: methods x corruptions x severities on shifted data, with reports and plots.

Nothing else in adaptkit imports this package.
"""

from __future__ import annotations

from adaptkit.bench.runner import BenchConfig, BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "run_bench"]
