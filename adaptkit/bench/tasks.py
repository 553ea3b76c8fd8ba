"""What each benchmark task scores: the row key and axis label of its metric.

Shared by :mod:`adaptkit.bench.report` (tables, summaries) and :mod:`adaptkit.bench.plots` (figures), so the
figures do not depend on the report module (the report calls the plots, never the reverse).

Example:
    >>> from adaptkit.bench.tasks import score_key
    >>> score_key("classification"), score_key("segmentation")
    (('accuracy', 'accuracy (%)'), ('miou', 'mIoU (%)'))
"""

from __future__ import annotations

#: task -> (row key of its score, axis label)
SCORES: dict[str, tuple[str, str]] = {
    "classification": ("accuracy", "accuracy (%)"),
    "segmentation": ("miou", "mIoU (%)"),
}


def score_key(task: str) -> tuple[str, str]:
    """The row key and axis label of a task's score: accuracy for classification, mIoU for segmentation."""
    return SCORES.get(task, SCORES["classification"])
