"""The benchmark runner: methods x corruptions x severities under a stream protocol."""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptkit
from adaptkit._progress import progress
from adaptkit.bench.heads import needs_head, prepare_head
from adaptkit.bench.models import cache_dir, load_model
from adaptkit.bench.spec import MethodSpec
from adaptkit.data.datasets import as_unit_float
from adaptkit.data.segmentation import IGNORE_INDEX
from adaptkit.data.streams import Domain, make_stream
from adaptkit.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

DEFAULT_METHODS = ("source", "bn_adapt:N=0", "bn_adapt:N=16", "tent", "eata")
#: default methods of ``task="segmentation"``: Tent's and OCL's learning rates (and OCL's BN prior) tuned on
#: 5 corruptions x 320 Fashion-MNIST scenes for the built-in LR-ASPP model (docs/benchmarks.md)
DEFAULT_SEG_METHODS = ("source", "bn_adapt:N=0", "tent:lr=1e-4", "ocl:lr=5e-4,bn_prior=0.01")
#: images per domain kept for the segmentation report's example figure
N_EXAMPLES = 4


def _default_corruptions() -> list[str]:
    from adaptkit.data.corruptions import CORRUPTIONS

    return list(CORRUPTIONS)


@dataclass
class BenchConfig:
    """Every setting of a benchmark run (recorded verbatim in the report).

    Attributes:
        task: ``classification`` or ``segmentation`` (scores are mIoU over per-pixel labels; with the
            classification defaults for ``model``, ``dataset`` and ``methods`` these switch to the built-in
            segmentation ones: ``fmnist_lraspp``, ``fashion_scenes`` and :data:`DEFAULT_SEG_METHODS`).
        model: ``fmnist_resnet`` (built-in, trained once and cached), ``fmnist_lraspp`` (built-in segmentation
            model), a torchvision name or a timm name.
        checkpoint: a state-dict file for ``model``.
        dataset: ``fashion_mnist`` (clean test set corrupted on the fly), ``cifar10c`` / ``cifar100c`` /
            ``imagenet_c`` (released files under ``data_root``) or ``synthetic`` (tiny generated data, for tests);
            for segmentation ``fashion_scenes`` (Fashion-MNIST items on textured canvases, corrupted on the fly),
            ``synthetic_scenes`` (tiny, for tests), or real shifted sets under ``data_root`` with no synthetic
            corruption: ``cityscapes`` (the val split, one domain) and ``acdc`` (val, one domain per condition).
        image_size: ``(H, W)`` to resize Cityscapes / ACDC to (e.g. ``(512, 1024)``, the OCL protocol).
        methods: method specs, e.g. ``["source", "bn_adapt:N=16", "tent:lr=1e-3"]``.
        corruptions / severities: the shifts to evaluate.
        protocol: ``reset_each_shift``, ``continual``, ``gradual`` or ``mixed``.
        batch_size: test batch size (1 allowed).
        n_samples: images per domain (``None``: all).
        dirichlet: non-i.i.d. label order with this Dirichlet concentration (``None``: shuffled i.i.d.).
        seed: seeds corruptions, subsets, stream order and adaptation.
        sweep: ``{"bn_adapt.N": [0, 16], "batch_size": [8, 32], "severity": [1, 5]}``: the cartesian product
            of these values is run.
        costs: measure each method's tensor memory on two extra batches of the first shift (see
            :func:`measure_cost`; timing comes from the run itself).
    """

    model: str = "fmnist_resnet"
    task: str = "classification"
    checkpoint: str | None = None
    num_classes: int | None = None
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    image_size: tuple[int, int] | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    corruptions: list[str] = field(default_factory=_default_corruptions)
    severities: list[int] = field(default_factory=lambda: [5])
    protocol: str = "reset_each_shift"
    batch_size: int = 64
    n_samples: int | None = None
    dirichlet: float | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    clean: bool = True
    shift_score: bool = True
    costs: bool = True
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    source_epochs: int | None = None
    progress: bool = True
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if self.task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {self.task!r}")
        if self.task == "segmentation":
            if self.model in ("fmnist_resnet", "fmnist-resnet"):
                self.model = "fmnist_lraspp"
            if self.dataset in ("fashion_mnist", "fmnist"):
                self.dataset = "fashion_scenes"
            if list(self.methods) == list(DEFAULT_METHODS):
                self.methods = list(DEFAULT_SEG_METHODS)
            if self.dirichlet is not None:
                raise ValueError("dirichlet (label-sorted streams) needs class labels, not segmentation masks")
        if self.source_epochs is None:
            self.source_epochs = 6 if self.task == "segmentation" else 3


@dataclass
class BenchResult:
    """Rows (one per method x domain x sweep point), shift scores per domain, config and environment."""

    config: BenchConfig
    rows: list[dict[str, Any]]
    shift: dict[str, float]
    env: dict[str, Any]
    out_dir: Path | None = None
    examples: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: ``{method label: {"peak_bytes", "state_bytes", "model_bytes"}}`` (see :func:`measure_cost`)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        cfg = asdict(self.config)
        return {"config": cfg, "env": self.env, "rows": self.rows, "shift": self.shift, "costs": self.costs}


def _env(config: BenchConfig) -> dict[str, Any]:
    return {
        "adaptkit": adaptkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": config.device,
        "cuda": torch.cuda.get_device_name(0) if config.device.startswith("cuda") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def synthetic_data(n: int = 256, size: int = 28, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny learnable grayscale data: class k is a bright square in quadrant k on a textured background."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.2 + 0.1 * torch.rand(n, 1, size, size, generator=gen)
    h = size // 2
    for k in range(classes):
        i, j = (k // 2) * h, (k % 2) * h
        x[y == k, :, i + 2 : i + h - 2, j + 2 : j + h - 2] += 0.6
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def _scenes(config: BenchConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from adaptkit.data.scenes import fashion_scenes, make_scenes

    if config.dataset == "synthetic_scenes":
        items, labels = synthetic_data(n=64, seed=config.seed + (0 if train else 1))
        return make_scenes(items, labels, 64, size=40, items=(1, 2), seed=config.seed + (0 if train else 1))
    n = 8000 if train else (config.n_samples or 1000)
    return fashion_scenes(n, train=train, root=config.data_root, seed=config.seed + (0 if train else 1))


def _clean_data(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    if config.dataset in ("fashion_scenes", "synthetic_scenes"):
        return _scenes(config, train=False)
    if config.dataset in ("fashion_mnist", "fmnist"):
        from adaptkit.data.datasets import FashionMNIST

        ds = FashionMNIST(config.data_root, train=False)
        return ds.images, ds.targets
    if config.dataset == "synthetic":
        return synthetic_data(seed=config.seed + 1)
    return None


def _train_data(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The source training split (for the auxiliary heads of test-time-training methods), when the dataset has one."""
    if config.dataset in ("fashion_scenes", "synthetic_scenes"):
        return _scenes(config, train=True)
    if config.dataset in ("fashion_mnist", "fmnist"):
        from adaptkit.data.datasets import FashionMNIST

        ds = FashionMNIST(config.data_root, train=True)
        return ds.images, ds.targets
    if config.dataset == "synthetic":
        return synthetic_data(seed=config.seed)
    return None


#: source images handed to methods that take in-distribution data (EATA's Fisher: 2,000 in the reference code)
N_SOURCE = 2000


def _source_batches(
    config: BenchConfig, train_data: tuple[torch.Tensor, torch.Tensor] | None
) -> list[torch.Tensor] | None:
    """Unlabeled batches of source training images (a seeded subset of ``N_SOURCE``) for ``source_data_arg``."""
    from adaptkit.data.datasets import subset

    data = train_data if train_data is not None else _train_data(config)
    if data is None:
        return None
    x, _ = subset(*data, N_SOURCE, config.seed + 1)
    x = as_unit_float(x)
    return [x[i : i + config.batch_size].to(config.device) for i in range(0, len(x), config.batch_size)]


def build_model(config: BenchConfig) -> nn.Module:
    """The source model of a run (the built-in one is trained on first use and cached)."""
    if config.model in ("fmnist_lraspp", "fmnist-lraspp"):
        from adaptkit.bench.seg_models import fmnist_seg_model, synthetic_seg_model

        if config.dataset == "synthetic_scenes":
            return synthetic_seg_model(*_scenes(config, train=True), seed=config.seed)
        return fmnist_seg_model(epochs=config.source_epochs, seed=config.seed, progress=config.progress)
    if config.model in ("fmnist_resnet", "fmnist-resnet") and config.dataset == "synthetic":
        from adaptkit.bench.models import SmallResNet, save_atomic, train_classifier

        path = cache_dir() / "models" / f"synthetic_v2_w8_s{config.seed}.pt"
        model = SmallResNet(1, 4, width=8, mean=0.4, std=0.25)
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            x, y = synthetic_data(seed=config.seed)
            train_classifier(model, x, y, epochs=3, batch_size=32, lr=0.05, seed=config.seed, progress=False)
            save_atomic(model.state_dict(), path)
        return model.eval()
    kw: dict[str, Any] = {}
    if config.model in ("fmnist_resnet", "fmnist-resnet"):
        kw = {"epochs": config.source_epochs, "seed": config.seed, "progress": config.progress}
    return load_model(config.model, config.num_classes, config.checkpoint, **kw)


def build_domains(
    config: BenchConfig, data: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[list[Domain], Domain | None]:
    """The shifted test sets (and the clean one when available) of a run; ``data`` overrides the dataset's
    clean ``(images, labels)``."""
    from adaptkit.data.datasets import CIFARC, CorruptedDataset, imagenet_c, subset

    domains: list[Domain] = []
    clean = data if data is not None else _clean_data(config)
    if clean is not None:
        x, y = subset(*clean, config.n_samples, config.seed)
        cache = cache_dir() / "corrupted" / (config.dataset if data is None else "user")
        pairs = list(itertools.product(config.corruptions, config.severities))
        for c, s in progress(pairs, len(pairs), "corrupting test data", config.progress):
            ds = CorruptedDataset(x, y, c, s, seed=config.seed, cache_dir=cache)
            domains.append(Domain(f"{c}-{s}", ds.images, y, c, s))
        return domains, Domain("clean", x, y, "clean", 0)
    if config.data_root is None:
        raise ValueError(f"dataset {config.dataset!r} needs --data-root pointing at the released files")
    if config.dataset in ("cityscapes", "acdc"):
        return _real_segmentation_domains(config), None
    for c, s in itertools.product(config.corruptions, config.severities):
        if config.dataset in ("cifar10c", "cifar100c"):
            ds = CIFARC(config.data_root, c, s)
            x, y = subset(ds.images, ds.targets, config.n_samples, config.seed)
        elif config.dataset == "imagenet_c":
            folder = imagenet_c(config.data_root, c, s)
            n = len(folder) if config.n_samples is None else min(config.n_samples, len(folder))
            items = [folder[i] for i in range(n)]
            x = torch.stack([a for a, _ in items])
            y = torch.tensor([b for _, b in items])
        else:
            raise ValueError(f"unknown dataset {config.dataset!r}")
        domains.append(Domain(f"{c}-{s}", x, y, c, s))
    return domains, None


def _real_segmentation_domains(config: BenchConfig) -> list[Domain]:
    """Cityscapes val (one domain) or ACDC val (one domain per weather condition) from ``config.data_root``."""
    from adaptkit.data.segmentation import ACDC, Cityscapes, stack

    if config.task != "segmentation":
        raise ValueError(f"dataset {config.dataset!r} holds segmentation masks: pass task='segmentation'")
    assert config.data_root is not None
    if config.dataset == "cityscapes":
        x, y = stack(Cityscapes(config.data_root, "val", size=config.image_size), config.n_samples)
        return [Domain("cityscapes-val", x, y, "cityscapes", 0)]
    domains = []
    for cond in ACDC(config.data_root, "val").conditions:
        x, y = stack(ACDC(config.data_root, "val", size=config.image_size, conditions=cond), config.n_samples)
        domains.append(Domain(f"acdc-{cond}", x, y, cond, 0))
    return domains


def _sweep_points(sweep: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    if not sweep:
        yield {}
        return
    keys = list(sweep)
    for values in itertools.product(*(sweep[k] for k in keys)):
        yield dict(zip(keys, values))


def _apply_point(spec: MethodSpec, point: dict[str, Any]) -> MethodSpec:
    over = dict(spec.overrides)
    for k, v in point.items():
        meth, dot, param = k.partition(".")
        if dot and meth.replace("-", "_") == spec.name:
            over[param] = v
    return MethodSpec(spec.name, over)


def evaluate(
    model: nn.Module,
    spec: MethodSpec,
    domains: Sequence[Domain],
    config: BenchConfig,
    batch_size: int,
    head: Any = None,
    examples: dict[str, dict[str, torch.Tensor]] | None = None,
    source_batches: list[torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run one method over a stream of ``domains``.

    Returns ``{domain: {correct, n, seconds}}`` for classification; for segmentation each domain also holds
    ``confmat`` (the pixel confusion matrix, ignoring label 255), and with ``examples`` the predictions of the
    first images of each domain are stored under ``examples[domain][spec.label]``.
    """
    device = torch.device(config.device)
    seg = config.task == "segmentation"
    kwargs = _method_kwargs(spec, head, source_batches)
    wrapper = None if spec.name == "source" else adaptkit.adapt(model, spec.name, **kwargs)
    stats: dict[str, dict[str, Any]] = {}
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)
        if config.amp
        else contextlib.nullcontext()
    )
    torch.manual_seed(config.seed)
    try:
        stream = make_stream(config.protocol, domains, batch_size, config.seed, config.dirichlet)
        total = sum(math.ceil(len(d.y) / batch_size) for d in domains)
        for batch in progress(stream, total, spec.label, config.progress):
            t0 = time.perf_counter()
            x = batch.x.to(device)
            with amp:
                if wrapper is None:
                    with torch.no_grad():
                        out = model(x)
                else:
                    if batch.reset:
                        wrapper.reset()
                    out = wrapper(x)
            logits = adaptkit.core.get_logits(out).detach().float()
            s = stats.setdefault(batch.domain, {"correct": 0.0, "n": 0.0, "seconds": 0.0})
            if seg:
                if logits.shape[-2:] != batch.y.shape[-2:]:
                    logits = F.interpolate(logits, size=batch.y.shape[-2:], mode="bilinear", align_corners=False)
                pred = logits.argmax(1).cpu()
                cm = confusion_matrix(pred, batch.y, logits.shape[1], ignore_index=IGNORE_INDEX)
                s["confmat"] = cm if "confmat" not in s else s["confmat"] + cm
                if examples is not None and batch.index is not None and config.protocol != "mixed":
                    keep = batch.index < N_EXAMPLES  # the first images of the domain, in any stream order
                    if bool(keep.any()):
                        buf = examples.setdefault(batch.domain, {}).setdefault(
                            spec.label, torch.zeros(N_EXAMPLES, *pred.shape[1:], dtype=torch.uint8)
                        )
                        buf[batch.index[keep]] = pred[keep].to(torch.uint8)
            else:
                pred = logits.argmax(1).cpu()
                s["correct"] += float((pred == batch.y).sum())
            s["n"] += len(batch.y)
            s["seconds"] += time.perf_counter() - t0
    finally:
        if wrapper is not None:
            wrapper.restore()
    return stats


def _method_kwargs(
    spec: MethodSpec, head: Any = None, source_batches: list[torch.Tensor] | None = None
) -> dict[str, Any]:
    """Constructor arguments of a method spec: its overrides, the trained head and the source batches."""
    kwargs = {k: v for k, v in spec.overrides.items() if not k.startswith("head.")}
    if head is not None:
        kwargs["head"] = head
    arg = None if spec.name == "source" else adaptkit.get_method(spec.name).source_data_arg
    if arg and arg not in kwargs and source_batches is not None:
        kwargs[arg] = source_batches
    return kwargs


def measure_cost(
    model: nn.Module,
    spec: MethodSpec,
    x: torch.Tensor,
    head: Any = None,
    source_batches: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Tensor memory of one method on batch ``x`` (:class:`~adaptkit.bench.memory.TensorMemory`, machine-free).

    Wraps the model and runs ``x`` twice: ``state_bytes`` is what the wrapper still holds after the first batch
    (snapshots, teachers and anchors, optimizer moments, memories, Fisher), ``peak_bytes`` the most tensor memory
    alive at once during the second batch (activations kept for backward, augmented copies, gradients).
    ``model_bytes`` is the size of the model's parameters and buffers. ``source``: a plain forward under no-grad.
    """
    from adaptkit.bench.memory import TensorMemory

    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    wrapper = None
    try:
        with TensorMemory() as held:
            if spec.name != "source":
                wrapper = adaptkit.adapt(model, spec.name, **_method_kwargs(spec, head, source_batches))
                out = wrapper(x)
                del out
        gc.collect()
        state_bytes = held.current  # read now: restore() below frees the optimizer state
        with TensorMemory() as peak:
            if wrapper is None:
                with torch.no_grad():
                    out = model(x)
            else:
                out = wrapper(x)
            del out
    finally:
        if wrapper is not None:
            wrapper.restore()
    return {"peak_bytes": float(peak.peak), "state_bytes": float(state_bytes), "model_bytes": float(model_bytes)}


def _score(s: dict[str, Any], seg: bool) -> dict[str, Any]:
    """The row fields of one domain's statistics: accuracy (%), or mIoU / pixel accuracy / per-class IoU (%)."""
    if not seg:
        acc = 100.0 * s["correct"] / max(s["n"], 1)
        return {"accuracy": acc, "error": 100.0 - acc}
    cm = s["confmat"]
    miou = 100.0 * mean_iou(cm)
    return {
        "miou": miou, "error": 100.0 - miou, "pixel_accuracy": 100.0 * pixel_accuracy(cm),
        "iou": [round(100.0 * v, 4) for v in iou_per_class(cm).tolist()],
    }  # fmt: skip


def run_bench(
    config: BenchConfig,
    write: bool = True,
    model: nn.Module | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BenchResult:
    """Run a benchmark and (with ``write``) write its report directory.

    Args:
        config: every setting (recorded in the report).
        write: write ``report.md``, JSON, CSV and plots to ``config.out_dir`` (default ``reports/bench-<time>``).
        model: your own model object instead of ``config.model`` (set ``config.model`` to a label for it).
        data: your own clean test data ``(images in [0, 1] or uint8, labels)``, corrupted on the fly.
        train_data: source training data for the heads of test-time-training methods (NC-TTT, TTT, ...);
            default: the dataset's training split when it has one.

    Example:
        >>> from adaptkit.bench import BenchConfig, run_bench
        >>> cfg = BenchConfig(dataset="synthetic", corruptions=["gaussian_noise"], severities=[5],
        ...                   methods=["source", "bn_adapt:N=0"], batch_size=32, progress=False)
        >>> res = run_bench(cfg, write=False)
        >>> sorted({r["method"] for r in res.rows})
        ['bn_adapt(N=0)', 'source']
    """
    torch.manual_seed(config.seed)
    domains, clean = build_domains(config, data)  # first: data errors surface before a model is trained
    model = (model if model is not None else build_model(config)).to(config.device)
    shift: dict[str, float] = {}
    if config.shift_score and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        for d in domains:
            xs = (d.x[i : i + 256] for i in range(0, min(len(d.x), 1024), 256))
            xs = (as_unit_float(b) for b in xs)
            shift[d.name] = adaptkit.shift_score(model, (b.to(config.device) for b in xs)).mean
    rows: list[dict[str, Any]] = []
    seg = config.task == "segmentation"
    examples: dict[str, dict[str, torch.Tensor]] = {}
    specs = [MethodSpec.parse(m) for m in config.methods]
    heads: dict[str, tuple[Any, nn.Module]] = {}
    source_batches = None
    if any(s.name != "source" and adaptkit.get_method(s.name).source_data_arg for s in specs):
        source_batches = _source_batches(config, train_data)
    for spec in specs:
        if spec.name != "source" and needs_head(spec.name):
            if train_data is None:
                train_data = _train_data(config)
            heads[spec.label] = prepare_head(
                model, spec, train_data, cache_dir() / "heads", config.model, config.seed, config.device,
                config.progress,
            )  # fmt: skip
    for point in _sweep_points(config.sweep):
        bs = int(point.get("batch_size", config.batch_size))
        sev = point.get("severity")
        doms = [d for d in domains if sev is None or d.severity == int(sev)]
        for spec0 in specs:
            spec = _apply_point(spec0, point)
            groups = [doms] + ([[clean]] if clean is not None and config.clean and sev is None else [])
            head, used = heads.get(spec0.label, (None, model))
            for group in groups:
                ex = examples if seg and not point else None
                for dom, s in evaluate(used, spec, group, config, bs, head, ex, source_batches).items():
                    d = next((x for x in group if x.name == dom), None)
                    rows.append({
                        "method": spec.label, "base_method": spec.name, "domain": dom,
                        "corruption": d.corruption if d else dom, "severity": d.severity if d else 0,
                        **_score(s, seg), "n": int(s["n"]), "batch_size": bs,
                        "seconds": s["seconds"], "protocol": config.protocol, **point,
                    })  # fmt: skip
    costs: dict[str, dict[str, float]] = {}
    if config.costs and domains and not config.sweep:
        x0 = as_unit_float(domains[0].x[: config.batch_size]).to(config.device)
        for spec in specs:
            head, used = heads.get(spec.label, (None, model))
            costs[spec.label] = measure_cost(used, spec, x0, head, source_batches)
    if seg:
        for d in [*domains, *([clean] if clean is not None else [])]:
            if d.name in examples:
                examples[d.name]["image"] = d.x[:N_EXAMPLES]
                examples[d.name]["target"] = d.y[:N_EXAMPLES]
    result = BenchResult(config, rows, shift, _env(config), examples=examples, costs=costs)
    if write:
        from adaptkit.bench.report import write_report

        out = Path(config.out_dir or Path("reports") / time.strftime("bench-%Y%m%d-%H%M%S"))
        write_report(result, out)
        result.out_dir = out
    return result
