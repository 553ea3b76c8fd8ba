"""``adaptkit bench``: the benchmark as a console command (a plug-in of :mod:`adaptkit.cli`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``bench`` on the ``adaptkit`` sub-parsers."""
    p = subparsers.add_parser(
        "bench",
        help="methods x corruptions x severities on shifted data, with a report",
        description=(
            "Run test-time adaptation methods on corrupted data and write a report directory (report.md, "
            "results.json, results.csv, plots). Default: the built-in Fashion-MNIST source model, all 15 "
            "corruptions at severity 5, source / BNAdapt(N=0) / BNAdapt(N=16) / Tent / EATA, reset each shift."
        ),
    )
    p.add_argument(
        "--task", default="classification", choices=["classification", "segmentation"],
        help="segmentation: mIoU on Fashion-MNIST scenes with the built-in LR-ASPP model, source/BNAdapt/Tent/OCL",
    )  # fmt: skip
    p.add_argument(
        "--model", help="fmnist_resnet / fmnist_lraspp (built-in; the default per task), a torchvision or timm name"
    )
    p.add_argument("--checkpoint", help="state-dict file for --model")
    p.add_argument("--num-classes", type=int)
    p.add_argument(
        "--dataset",
        help="fashion_mnist (default), cifar10c, cifar100c, imagenet_c, synthetic; segmentation: fashion_scenes "
        "(default), synthetic_scenes, cityscapes, acdc (val splits under --data-root)",
    )
    p.add_argument("--data-root", help="folder with the released CIFAR-C / ImageNet-C / Cityscapes / ACDC files")
    p.add_argument(
        "--image-size", nargs=2, type=int, metavar=("H", "W"), help="resize Cityscapes / ACDC (OCL: 512 1024)"
    )
    p.add_argument("--methods", nargs="+", help="method specs, e.g. source bn_adapt:N=16 tent:lr=1e-3")
    p.add_argument(
        "--corruptions", nargs="+", help="corruption names (default: the 15 standard ones); 'all' adds the 4 extra"
    )
    p.add_argument("--severities", nargs="+", type=int, default=[5])
    p.add_argument(
        "--protocol", default="reset_each_shift", choices=["reset_each_shift", "continual", "gradual", "mixed"]
    )
    p.add_argument("--batch-size", type=int, help="default 64 (classification), 16 (segmentation)")
    p.add_argument("--n-samples", type=int, help="images per shift (default: all)")
    p.add_argument("--dirichlet", type=float, help="non-i.i.d. labels: Dirichlet concentration (e.g. 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--no-clean", action="store_true", help="skip the clean-data row")
    p.add_argument("--no-shift-score", action="store_true")
    p.add_argument(
        "--no-costs", action="store_true",
        help="skip the per-method tensor-memory measurement (two extra batches per method)",
    )  # fmt: skip
    p.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2",
        help="repeatable; e.g. --sweep bn_adapt.N=0,4,16,inf --sweep batch_size=1,8,32 --sweep severity=1,3,5",
    )  # fmt: skip
    p.add_argument(
        "--source-epochs", type=int, help="epochs for the built-in source model (default 3; segmentation 6)"
    )
    p.add_argument("--out", help="report directory (default: reports/bench-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``adaptkit bench``."""
    from adaptkit.bench.runner import DEFAULT_METHODS, DEFAULT_SEG_METHODS, BenchConfig, run_bench
    from adaptkit.bench.spec import parse_sweep
    from adaptkit.cli import CLIError
    from adaptkit.data.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS

    corruptions = list(CORRUPTIONS)
    if args.corruptions:
        corruptions = (
            list(CORRUPTIONS) + list(EXTRA_CORRUPTIONS) if args.corruptions == ["all"] else list(args.corruptions)
        )
    unknown = [c for c in corruptions if c not in (*CORRUPTIONS, *EXTRA_CORRUPTIONS)]
    if unknown:
        known = [*CORRUPTIONS, *EXTRA_CORRUPTIONS]
        print(f"adaptkit bench: unknown corruptions {unknown}; choose from {known}", file=sys.stderr)
        return 2
    sweep = dict(parse_sweep(s) for s in args.sweep)
    severities = args.severities
    if "severity" in sweep:
        severities = sorted({int(v) for v in sweep["severity"]})
    seg = args.task == "segmentation"
    try:
        cfg = BenchConfig(
            task=args.task, model=args.model or ("fmnist_lraspp" if seg else "fmnist_resnet"),
            checkpoint=args.checkpoint, num_classes=args.num_classes,
            dataset=args.dataset or ("fashion_scenes" if seg else "fashion_mnist"),
            data_root=args.data_root, image_size=tuple(args.image_size) if args.image_size else None,
            methods=list(args.methods or (DEFAULT_SEG_METHODS if seg else DEFAULT_METHODS)),
            corruptions=corruptions, severities=severities, protocol=args.protocol,
            batch_size=args.batch_size or (16 if seg else 64), n_samples=args.n_samples,
            dirichlet=args.dirichlet, seed=args.seed, device=args.device, amp=args.amp, clean=not args.no_clean,
            shift_score=not args.no_shift_score, costs=not args.no_costs, sweep=sweep,
            source_epochs=args.source_epochs,
            progress=not args.quiet, out_dir=args.out,
        )  # fmt: skip
        result = run_bench(cfg)
    except (ValueError, FileNotFoundError) as e:  # settings or data the user can fix: no traceback
        raise CLIError(str(e)) from e
    assert result.out_dir is not None
    print((result.out_dir / "report.md").read_text().split("\n![")[0])
    print(f"report: {result.out_dir.resolve()}")
    return 0
