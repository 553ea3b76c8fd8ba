"""Safe checkpoint files: what adaptkit saves holds only tensors and plain values, and what it loads is read with
``torch.load(..., weights_only=True)`` (no code runs), with a clear error for a truncated or foreign file.

The plain values are the ones the ``weights_only`` unpickler of every supported torch (2.1 and later) reads:
tensors, ``torch.Size``, ``None``, ``bool``, ``int``, ``float``, ``str`` and ``dict`` / ``OrderedDict`` / ``list``
/ ``tuple`` of them (no ``Counter``, ``set``, ``bytes``, ``torch.device``, numpy value, named tuple or other
object: torch 2.1 refuses them, and an object would be pickled as a reference to its class).
"""

from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["check_plain", "load_weights_only", "save_atomic"]

_LEAVES = (type(None), bool, int, float, str)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def check_plain(obj: Any, who: str, what: str, where: str = "") -> None:
    """Raise ``TypeError`` naming the first value of ``obj`` that is not a tensor or plain value (see the module).

    Example:
        >>> import torch
        >>> from adaptkit.core.serialization import check_plain
        >>> check_plain({"w": torch.zeros(2), "steps": [1, 2.0, None]}, "x", "a checkpoint")
        >>> try:
        ...     check_plain({"f": len}, "x", "a checkpoint")
        ... except TypeError as e:
        ...     print(str(e)[:62])
        x: cannot save ['f'] (a builtin_function_or_method) in a check
    """
    kind = type(obj)
    if kind in _LEAVES or kind in _TENSORS or kind is torch.Size:
        return
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, who, what, f"{where}[{k!r}] (its key)")
            check_plain(v, who, what, f"{where}[{k!r}]")
        return
    if kind in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, who, what, f"{where}[{i}]")
        return
    raise TypeError(
        f"{who}: cannot save {where or 'the value'} (a {kind.__name__}) in {what}: only tensors, numbers, strings, "
        "None, torch.Size and dicts / lists / tuples of them are written, so that torch.load(..., weights_only=True) "
        "reads the file without running code; convert it to one of these"
    )


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a temporary file next to ``path`` and a rename: an interrupted save never
    leaves a truncated file at ``path``."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights_only(path: str | os.PathLike[str], who: str, what: str, hint: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file it cannot read raises ``ValueError`` saying why and ``hint``
    (what to do), chained to torch's error. A missing, unreadable path or a folder raises the ``OSError`` as it is.

    Example:
        >>> import os, tempfile
        >>> from adaptkit.core.serialization import load_weights_only
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> with open(path, "w") as f:
        ...     _ = f.write("not a checkpoint")
        >>> try:
        ...     load_weights_only(path, "demo", "an adaptkit file", "pass another path")
        ... except ValueError as e:
        ...     print(str(e).split(": ", 2)[2][:42])
        it is not a file written by torch.save, or
    """
    name = os.fspath(path)
    try:
        return torch.load(name, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
        raise  # clear as they are (a truncated zip can raise a bare OSError: EINVAL, which is wrapped)
    except Exception as e:
        raise ValueError(f"{who}: cannot read {name!r} as {what}: {_why(name, e)}; {hint}") from e


def _why(path: str, e: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words."""
    found = re.search(r"(?:Unsupported global: GLOBAL|Unsupported class) ([\w.<>]+)", str(e))
    if found:
        return (
            f"it holds a pickled Python object ({found.group(1)}) besides tensors and plain values, and "
            "weights_only=True refuses to run code: it was not written by adaptkit"
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        magic = b""
    if not magic:
        return "the file is empty (an interrupted save or copy?)"
    if magic == b"PK\x03\x04":  # a zip archive, torch.save's format, that torch cannot read to the end
        return f"the file is truncated or corrupt (an interrupted save or copy?) ({_short(e)})"
    return f"it is not a file written by torch.save, or it is truncated ({_short(e)})"


def _short(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's messages run over many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler error: "))]
    text = (detail or lines or [""])[-1 if detail else 0].removeprefix("WeightsUnpickler error: ")
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
