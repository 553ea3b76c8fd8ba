"""Adaptation methods, one file each; importing this package registers them."""

from __future__ import annotations

from adaptkit.methods.bn_adapt import BNAdapt
from adaptkit.methods.clust3 import ClusT3
from adaptkit.methods.nc_ttt import NCTTT
from adaptkit.methods.ocl import OCL
from adaptkit.methods.tent import Tent
from adaptkit.methods.ttt import TTT
from adaptkit.methods.tttpp import TTTPlusPlus

__all__ = ["BNAdapt", "ClusT3", "NCTTT", "OCL", "TTT", "TTTPlusPlus", "Tent"]
