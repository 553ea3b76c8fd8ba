"""Resource counts over a long online stream: 75 consecutive shifts (15 corruptions x 5 severities), no reset.

For every registered method, a model is wrapped once and adapts online (``episodic=False``) on a continual stream
of corrupted batches; after every shift the script counts what could leak: live tensors seen by the garbage
collector, hooks on the model (forward, pre-forward, backward, per-parameter), optimizer state tensors and their
bytes, parameters holding a ``.grad``, and the process's peak RSS. Counts, not times: a flat series is the claim.

Usage::

    .venv/bin/python benchmarks/long_stream.py --json benchmarks/results/long_stream.json

Options: ``--batches-per-shift``, ``--batch-size``, ``--size``, ``--model`` (``small_resnet``: the bench's built-in
CIFAR-style ResNet with random weights, or ``resnet18``), ``--methods``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
from typing import Any

import torch
import torch.nn as nn

import adaptkit
from adaptkit.data.corruptions import CORRUPTIONS, corrupt

SEVERITIES = (1, 2, 3, 4, 5)


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    for p in model.parameters():
        n += len(getattr(p, "_backward_hooks", None) or {})
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def optimizer_state(w: adaptkit.TTAMethod) -> tuple[int, int]:
    if w.optimizer is None:
        return 0, 0
    tensors = [v for st in w.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def build_model(name: str, size: int) -> nn.Module:
    if name == "small_resnet":
        from adaptkit.bench.models import SmallResNet

        model = SmallResNet(num_classes=10, in_channels=3)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10)
    return model.eval()


def wrap(method: str, model: nn.Module, size: int) -> adaptkit.TTAMethod:
    cls = adaptkit.get_method(method)
    kw: dict[str, Any] = {"episodic": False}
    if method in {"ncttt", "clust3", "ttt", "ttt_pp"}:
        g = torch.Generator().manual_seed(7)
        data = [torch.rand(8, 3, size, size, generator=g) for _ in range(2)]
        kw["head"] = cls.train_head(model, 1, data, epochs=1, progress=False)
        kw["layer"] = 1
        if method == "ttt_pp":
            kw["lr"] = 1e-4
    return cls(model, **kw)


def run(method: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(args.model, args.size)
    clean = torch.rand(args.batch_size * args.batches_per_shift, 3, args.size, args.size)
    # the stream is generated up front: corruption caches (kernels, textures) must not count as the method's growth
    stream = [
        (c, s, corrupt(clean, c, severity=s, generator=i))
        for i, (c, s) in enumerate((c, s) for c in CORRUPTIONS for s in SEVERITIES)
    ]
    w = wrap(method, model, args.size)
    rows = []
    for shift, (corruption, severity, data) in enumerate(stream):
        with torch.no_grad():
            for x in data.split(args.batch_size):
                w(x)
        del x
        n_opt, opt_bytes = optimizer_state(w)
        rows.append(
            {
                "shift": shift,
                "corruption": corruption,
                "severity": severity,
                "live_tensors": live_tensors(),
                "hooks": hook_count(model),
                "optimizer_tensors": n_opt,
                "optimizer_bytes": opt_bytes,
                "grads_held": sum(p.grad is not None for p in model.parameters()),
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    w.restore()
    after = {"hooks_after_restore": hook_count(model)}
    first, last = rows[1], rows[-1]  # after the first shift: optimizer state and lazy buffers exist
    keys = ("live_tensors", "hooks", "optimizer_tensors", "optimizer_bytes", "grads_held")
    return {
        "method": method,
        "shifts": len(rows),
        "growth_after_shift_1": {k: last[k] - first[k] for k in keys},
        "max_rss_mb_first_last": [rows[0]["max_rss_mb"], last["max_rss_mb"]],
        **after,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=adaptkit.list_methods())
    ap.add_argument("--model", default="small_resnet")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches-per-shift", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    print(f"{'method':10s} shifts  d_tensors d_hooks d_opt_tensors d_opt_bytes d_grads  hooks_after_restore  RSS MB")
    for method in args.methods:
        if method == "ocl":
            continue  # segmentation method: a classifier stream does not apply (its own memory test covers it)
        r = run(method, args)
        g = r["growth_after_shift_1"]
        print(
            f"{method:10s} {r['shifts']:6d} {g['live_tensors']:10d} {g['hooks']:7d} {g['optimizer_tensors']:13d} "
            f"{g['optimizer_bytes']:11d} {g['grads_held']:7d} {r['hooks_after_restore']:20d} "
            f"{r['max_rss_mb_first_last'][0]:.0f} -> {r['max_rss_mb_first_last'][1]:.0f}",
            flush=True,
        )
        results.append(r)
    env = {
        "torch": torch.__version__,
        "adaptkit": adaptkit.__version__,
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "model": args.model,
        "size": args.size,
        "batch_size": args.batch_size,
        "batches_per_shift": args.batches_per_shift,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
