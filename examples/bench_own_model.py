"""Benchmark your own model on corrupted copies of your own test data, in 15 lines.

Run: python examples/bench_own_model.py   (writes reports/own-model/report.md)
"""

import torch
import torchvision

from adaptkit.bench import BenchConfig, run_bench

model = torchvision.models.resnet18(num_classes=10).eval()  # yours: load your weights here
images, labels = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))  # yours: clean test images in [0, 1]
config = BenchConfig(
    model="my-resnet18", dataset="my-data", corruptions=["gaussian_noise", "fog"], severities=[3, 5],
    methods=["source", "bn_adapt:N=16", "tent:lr=1e-3"], batch_size=32, out_dir="reports/own-model",
)  # fmt: skip
result = run_bench(config, model=model, data=(images, labels))
print((result.out_dir / "report.md").read_text())
