"""The ``adaptkit`` console script: ``adaptkit --version``, ``adaptkit layers``, ``adaptkit methods``.

Subcommands are plug-ins: each is a module exposing ``add_parser(subparsers)`` that adds one sub-parser and
sets its ``func`` default to a callable ``(args: argparse.Namespace) -> int``. The built-in ones live in
this file; further ones are listed in :data:`SUBCOMMAND_MODULES` (e.g. ``adaptkit.bench.cli`` for
``adaptkit bench``) and are skipped while their module does not exist. Plug-in modules must keep their
heavy imports inside ``func`` so that ``adaptkit --help`` stays fast.

Example:
    >>> from adaptkit.cli import main
    >>> main(["methods"])  # doctest: +ELLIPSIS
    bn_adapt  ...
    0
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

import torch.nn as nn

from adaptkit._version import __version__
from adaptkit.models import ModelLookupError, build_model  # build_model re-exported: adaptkit.cli.build_model

#: Modules that contribute a subcommand through ``add_parser(subparsers)``; absent modules are skipped.
SUBCOMMAND_MODULES: tuple[str, ...] = ("adaptkit.bench.cli",)

_KIND_LABELS = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm", "frozen_batch": "FrozenBatchNorm"}


class CLIError(Exception):
    """A user error: printed as ``adaptkit <command>: <message>`` and exit code 2."""


# ---------------------------------------------------------------------------------------------- layers
def _layers_summary(model: nn.Module) -> str:
    from adaptkit.core.layers import list_layers, stage_names

    rows = list_layers(model, norm_only=True)
    counts = {k: sum(1 for r in rows if r.norm == k) for k in _KIND_LABELS}
    frozen = sum(1 for r in rows if r.frozen)
    parts = [f"{counts[k]} {label}" for k, label in _KIND_LABELS.items() if k != "frozen_batch" or counts[k]]
    stages = stage_names(model)
    stage_txt = ", ".join(f"{i}={n}" for i, n in enumerate(stages)) if stages else "none"
    return (
        f"summary: {', '.join(parts)} layers ({frozen} frozen); layer= stage indices 0..{len(stages) - 1}: {stage_txt}"
    )


def _cmd_layers(args: argparse.Namespace) -> int:
    from adaptkit.core.layers import format_layers, list_layers

    try:
        model, source = build_model(args.model, args.source, args.num_classes)
    except ModelLookupError as e:
        raise CLIError(str(e)) from e
    print(f"# {args.model} ({source}, random weights)")
    print(format_layers(list_layers(model, norm_only=args.norm_only)))
    print(_layers_summary(model))
    return 0


def _add_layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layers",
        help="list a model's modules, norm layers and the stage indices accepted by layer=",
        description=(
            "Build a torchvision or timm model with random weights (nothing is downloaded) and print "
            "adaptkit.list_layers(model): qualified names, types, norm kind, frozen flag, stage index."
        ),
    )
    p.add_argument("model", help="model name, e.g. resnet18 (torchvision) or convnext_atto (timm)")
    p.add_argument("--norm-only", action="store_true", help="list only normalisation layers")
    p.add_argument(
        "--source",
        choices=("torchvision", "timm", "auto"),
        default="auto",
        help="where to look the name up (default: auto = torchvision first, then timm)",
    )
    p.add_argument("--num-classes", type=int, default=None, metavar="K", help="classifier width (default: library's)")
    p.set_defaults(func=_cmd_layers)


# ---------------------------------------------------------------------------------------------- methods
def _first_line(doc: str | None) -> str:
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _cmd_methods(args: argparse.Namespace) -> int:
    import adaptkit

    names = adaptkit.list_methods()
    width = max((len(n) for n in names), default=0)
    for name in names:
        cls = adaptkit.get_method(name)
        print(f"{name:<{width}}  {cls.__name__}: {_first_line(cls.__doc__)}")
    return 0


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered adaptation methods")
    p.set_defaults(func=_cmd_methods)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The ``adaptkit`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="adaptkit", description="adaptkit: drop-in test-time adaptation for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"adaptkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    _add_layers(sub)
    _add_methods(sub)
    for modname in SUBCOMMAND_MODULES:
        try:
            found = importlib.util.find_spec(modname) is not None
        except ModuleNotFoundError:  # the parent package does not exist (yet)
            found = False
        if found:
            importlib.import_module(modname).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adaptkit`` command line; returns the exit code (0 ok, 2 usage or lookup error).

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"adaptkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` & co.: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
