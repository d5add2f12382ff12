"""`increlora-serve` and `python -m serving.cli`: the command lives in serving.http.cli."""
from __future__ import annotations

import sys

from .http.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
