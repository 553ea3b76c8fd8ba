"""NC-TTT time per adapted batch: adaptkit (hook truncation) vs a hand-truncated ResNet loop vs the full model.

Three implementations of the same episodic NC-TTT batch (restore, ``steps`` Adam iterations on the encoder up
to the tapped layer, the BN refresh pass, the eval-mode prediction), timed interleaved in one process on the
same inputs, medians over the rounds:

* ``adaptkit``: ``adaptkit.NCTTT(model, layer, head)`` (forward stopped at the tap by a hook);
* ``hand``: the loop written for a torchvision ResNet by hand: ``layer1(maxpool(relu(bn1(conv1(x)))))`` for the
  iterations, ``load_state_dict`` restore (what a ResNet-specific script does);
* ``full``: the official code's structure: every iteration runs the whole model (``model.train()``), the
  loss is taken from a forward hook on the tapped layer; then an eval-mode prediction.

Goals (issue): adaptkit <= 1.1x hand; full >= 3x adaptkit. Random weights, nothing downloaded.

Usage::

    python benchmarks/ncttt_truncation.py --json benchmarks/results/ncttt_truncation.json
    python benchmarks/ncttt_truncation.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

import adaptkit
from adaptkit import NCTTT, NCTTTHead


def calibrated(arch: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.get_model(arch, weights=None, num_classes=1000)
    m.train()
    with torch.no_grad():
        m(torch.rand(8, 3, size, size))
    return m.eval()


def bound_head(model: nn.Module, layer: str, size: int, embed: int) -> NCTTTHead:
    torch.manual_seed(1)
    with torch.no_grad():
        feats = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(torch.zeros(1, 3, size, size))))))
    head = NCTTTHead(feats.shape[1], embed_dim=embed)
    head.bind([layer], [tuple(feats.shape[1:])], model, (3, size, size))
    return head.eval()


class HandNCTTT:
    """The NC-TTT batch written by hand for a torchvision ResNet (tap = layer1)."""

    def __init__(self, model: nn.Module, head: NCTTTHead, steps: int, lr: float) -> None:
        self.m, self.h, self.steps, self.lr = model, head, steps, lr
        self.enc = ["conv1", "bn1", "layer1"]
        self.params = [p for n, p in model.named_parameters() if n.split(".")[0] in self.enc]
        self.state = copy.deepcopy(model.state_dict())
        self.up_bn = [b for n, b in model.named_modules() if n.split(".")[0] in self.enc and isinstance(b, _BatchNorm)]
        self.above_bn = [b for b in model.modules() if isinstance(b, _BatchNorm) and b not in self.up_bn]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        for p in head.parameters():
            p.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        return m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        m.load_state_dict(self.state)
        opt = torch.optim.Adam(self.params, lr=self.lr)
        for b in self.up_bn:
            b.train()
        self.h.discriminator.train()
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = F.softplus(-self.h.discriminator(self.h.projector(self.encode(x)))).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            for b in self.up_bn:
                b.momentum = 0.0
            feats = self.encode(x)
            for b in self.up_bn:
                b.momentum = 0.1
                b.eval()
            for b in self.above_bn:  # the refresh: `steps` momentum updates in closed form
                b.momentum = 1 - 0.9**self.steps
                b.train()
            m.fc(torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(feats)))), 1))
            for b in self.above_bn:
                b.momentum = 0.1
                b.eval()
            self.h.discriminator.eval()
            return m(x)


class FullNCTTT(HandNCTTT):
    """Official-code structure: the whole model in train mode on every iteration; loss from a hook."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        m.load_state_dict(self.state)
        opt = torch.optim.Adam(self.params, lr=self.lr)
        got: dict[str, torch.Tensor] = {}
        handle = m.layer1.register_forward_hook(lambda mod, i, o: got.__setitem__("f", o))
        m.train()
        self.h.discriminator.train()
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    m(x)
                    loss = F.softplus(-self.h.discriminator(self.h.projector(got.pop("f")))).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            handle.remove()
            m.eval()
            self.h.discriminator.eval()
        with torch.no_grad():
            return m(x)


def median_time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="resnet18, 64 px, 3 steps, 2 rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.arch, args.size, args.steps, args.rounds, args.batch_size = "resnet18", 64, 3, 2, 4
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    impls: dict[str, Callable[[], Any]] = {}

    model_a = calibrated(args.arch, args.size)
    head_a = bound_head(model_a, "layer1", args.size, args.embed_dim)
    wrapper = NCTTT(model_a, layer="layer1", head=head_a, steps=args.steps, lr=1e-5)
    impls["adaptkit"] = lambda: wrapper(x)
    model_h = calibrated(args.arch, args.size)
    hand = HandNCTTT(model_h, copy.deepcopy(head_a), args.steps, 1e-5)
    impls["hand"] = lambda: hand(x)
    model_f = calibrated(args.arch, args.size)
    full = FullNCTTT(model_f, copy.deepcopy(head_a), args.steps, 1e-5)
    impls["full"] = lambda: full(x)

    with torch.no_grad():
        outs = {k: f() for k, f in impls.items()}  # warm-up, and agreement of the three implementations
    agree = {k: float((outs[k] - outs["adaptkit"]).abs().max()) for k in outs}
    times: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(args.rounds):
        for k, f in impls.items():
            times[k].append(median_time(f))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "settings": vars(args) | {"torch": torch.__version__, "adaptkit": adaptkit.__version__,
                                  "machine": platform.processor() or platform.machine()},
        "seconds_per_batch": med,
        "all_seconds": times,
        "adaptkit_over_hand": med["adaptkit"] / med["hand"],
        "full_over_adaptkit": med["full"] / med["adaptkit"],
        "max_abs_diff_vs_adaptkit": agree,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k != "all_seconds"}, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
