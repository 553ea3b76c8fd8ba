"""``python -m adaptkit``: the same as the ``adaptkit`` console script."""

from __future__ import annotations

from adaptkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
