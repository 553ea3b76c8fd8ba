"""``adaptkit bench`` with one deviation from NC-TTT's reference test loss: the discriminator's BatchNorm uses its
running statistics (from training, where it saw in- and out-of-distribution views together) instead of the
test batch's statistics (the official code runs the whole network in training mode). A what-if for
docs/benchmarks.md, not a library option (it did not help: 77.9 vs 78.1 for BNAdapt). Arguments as for
``adaptkit bench``, e.g.::

    python benchmarks/ncttt_disc_running_bn.py bench --n-samples 500 --no-shift-score --no-clean \\
        --methods source "ncttt:layer=2,bn_mode=batch,lr=1e-4,head.epochs=6,head.batch_size=64"
"""

from __future__ import annotations

import contextlib
import sys

import adaptkit.heads.ncttt as ncttt_head
from adaptkit.cli import main

ncttt_head.batch_stats_mode = lambda module: contextlib.nullcontext()  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
