"""The warning category of adaptkit (a leaf module: every layer may import it)."""

from __future__ import annotations


class AdaptationWarning(UserWarning):
    """The category of every warning adaptkit emits (small batches, data outside the expected range, frozen or
    untracked norm layers, a method running without what it needs).

    Example:
        >>> import warnings, adaptkit
        >>> warnings.filterwarnings("ignore", category=adaptkit.AdaptationWarning)
    """
