"""adaptkit: drop-in test-time adaptation for PyTorch.

Example:
    >>> import torch, torchvision, adaptkit
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> with adaptkit.BNAdapt(model, N=16) as m:
    ...     logits = m(torch.rand(4, 3, 32, 32))
    >>> logits.shape
    torch.Size([4, 10])
"""

from __future__ import annotations

from adaptkit import methods as _methods  # noqa: F401  (registers the methods)
from adaptkit._version import __version__
from adaptkit.core.alerts import AdaptationWarning
from adaptkit.core.base import TTAMethod
from adaptkit.core.layers import list_layers
from adaptkit.heads.clust3 import ClusT3Head
from adaptkit.heads.ncttt import NCTTTHead
from adaptkit.heads.rotation import RotationHead
from adaptkit.heads.tttpp import TTTPPHead
from adaptkit.methods.bn_adapt import BNAdapt
from adaptkit.methods.clust3 import ClusT3
from adaptkit.methods.cotta import CoTTA
from adaptkit.methods.eata import EATA
from adaptkit.methods.eta import ETA
from adaptkit.methods.lame import LAME
from adaptkit.methods.memo import MEMO
from adaptkit.methods.nc_ttt import NCTTT
from adaptkit.methods.ocl import OCL
from adaptkit.methods.rotta import RoTTA
from adaptkit.methods.sar import SAR
from adaptkit.methods.shot_im import SHOTIM
from adaptkit.methods.t3a import T3A
from adaptkit.methods.tent import Tent
from adaptkit.methods.ttt import TTT
from adaptkit.methods.tttpp import TTTPlusPlus
from adaptkit.registry import adapt, get_method, list_methods, register_method
from adaptkit.shift import ShiftScore, shift_score

__all__ = [
    "AdaptationWarning",
    "BNAdapt",
    "ClusT3",
    "ClusT3Head",
    "CoTTA",
    "EATA",
    "ETA",
    "LAME",
    "MEMO",
    "NCTTT",
    "NCTTTHead",
    "OCL",
    "RoTTA",
    "RotationHead",
    "SAR",
    "SHOTIM",
    "ShiftScore",
    "T3A",
    "TTAMethod",
    "TTT",
    "TTTPPHead",
    "TTTPlusPlus",
    "Tent",
    "__version__",
    "adapt",
    "get_method",
    "list_layers",
    "list_methods",
    "register_method",
    "shift_score",
]
