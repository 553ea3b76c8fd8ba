"""Adaptation methods, one file each; importing this package registers them."""

from __future__ import annotations

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

__all__ = [
    "BNAdapt",
    "ClusT3",
    "CoTTA",
    "EATA",
    "ETA",
    "LAME",
    "MEMO",
    "NCTTT",
    "OCL",
    "RoTTA",
    "SAR",
    "SHOTIM",
    "T3A",
    "TTT",
    "TTTPlusPlus",
    "Tent",
]
