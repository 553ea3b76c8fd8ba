"""NC-TTT's source protocol on Fashion-MNIST: the built-in SmallResNet trained from scratch *jointly* with an
NC-TTT head (CE + aux, as the paper's source training), then saved for ``adaptkit bench``.

The encoder follows the built-in source model's recipe (SGD 0.1, Nesterov momentum 0.9, wd 5e-4, one-cycle, batch
256, 2-px shift + flip, 3 epochs); the head has its own Adam (lr 1e-3): with the encoder's SGD it does not learn
in 3 epochs (docs/benchmarks.md). Then::

    python benchmarks/ncttt_joint_fmnist.py --layer layer2 --epochs 3 --out reports/ncttt_joint
    adaptkit bench --model reports/ncttt_joint/model.pt --n-samples 500 --no-shift-score --methods source \\
        bn_adapt:N=0 tent "ncttt:layer=2,bn_mode=batch,lr=1e-4,head.path=reports/ncttt_joint/head.pt"

(~10 min of training on 2 cores, ~5 min of evaluation). Result in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptkit.bench.models import SmallResNet, _progress, shift_flip
from adaptkit.core.hooks import HookManager
from adaptkit.core.truncate import ForwardStopper
from adaptkit.data.datasets import FashionMNIST, as_unit_float
from adaptkit.heads.ncttt import NCTTTHead


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", default="layer2", choices=["layer1", "layer2", "layer3"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--embed-dim", type=int, default=1536)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports/ncttt_joint")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layer = args.layer
    model = SmallResNet(1, 10, 16)
    head = NCTTTHead({"layer1": 16, "layer2": 32, "layer3": 64}[layer], embed_dim=args.embed_dim)
    train = FashionMNIST(train=True)
    hooks = HookManager()
    stop = ForwardStopper({layer: dict(model.named_modules())[layer]}, hooks)
    x0 = as_unit_float(train.images[:2])
    model.eval()
    with torch.no_grad():
        f0 = stop.run(model, x0)[layer]
    head.bind([layer], [tuple(f0.shape[1:])], model, tuple(x0.shape[1:]))
    bs, n = 256, len(train.targets)
    steps = args.epochs * ((n + bs - 1) // bs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.15)
    head_opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    head.train()
    t0 = time.time()
    history = []
    for ep in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        ce_sum, aux_sum, count = 0.0, 0.0, 0
        for lo in _progress(range(0, n, bs), (n + bs - 1) // bs, f"joint {ep + 1}/{args.epochs}", True):
            idx = perm[lo : lo + bs]
            x, y = shift_flip(as_unit_float(train.images[idx]), gen), train.targets[idx]
            out, got = stop.capture(model, x)
            ce = F.cross_entropy(out, y)
            aux = head.train_loss([got[layer]], None, gen)
            opt.zero_grad()
            head_opt.zero_grad()
            (ce + args.aux_weight * aux).backward()
            opt.step()
            head_opt.step()
            sched.step()
            ce_sum += float(ce) * len(idx)
            aux_sum += float(aux) * len(idx)
            count += len(idx)
        history.append({"epoch": ep + 1, "ce": ce_sum / count, "aux": aux_sum / count, "seconds": time.time() - t0})
        print(json.dumps(history[-1]), flush=True)
    hooks.remove_all()
    model.eval()
    head.eval()
    test = FashionMNIST(train=False)
    with torch.no_grad():
        correct = sum(
            int((model(as_unit_float(test.images[i : i + 1000])).argmax(1) == test.targets[i : i + 1000]).sum())
            for i in range(0, len(test.targets), 1000)
        )
    acc = 100.0 * correct / len(test.targets)
    print(f"clean test accuracy {acc:.2f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model, out / "model.pt")  # a whole pickled model: `adaptkit bench --model <path>`
    head.history = [{"epoch": float(h["epoch"]), "train_loss": h["aux"]} for h in history]
    head.save(out / "head.pt")
    (out / "history.json").write_text(json.dumps({"history": history, "clean_accuracy": acc}, indent=2))
    print(f"wrote {out}/model.pt, head.pt, history.json")


if __name__ == "__main__":
    main()
