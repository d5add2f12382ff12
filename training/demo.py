"""`make demo`: train the three real tasks on the embedded MiniLM backbone, then serve them.

    python -m training.demo [--adapters adapters] [--steps 300] [--no-serve]

Training is short (a few minutes per task on a laptop CPU); finished adapters are reused, and a
run stopped with Ctrl-C continues where it stopped. Serving runs `increlora-serve` on the folder.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from .cli import main as train

TASKS = "rotten_tomatoes,sms_spam,bbc_news"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="adapters")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args(argv)
    # A schedule that spends the rank budget (36 modules, avg rank 2) well before the last step.
    code = train(["--tasks", TASKS, "--output", args.adapters, "--resume", "--steps", str(args.steps),
                  "--batch-size", "16", "--max-length", "64", "--lr", "1e-3", "--save-steps", "50",
                  "--init-warmup", str(args.steps // 5), "--interval", str(max(1, args.steps // 60)),
                  "--top-h", "2", "--warmup-steps", str(args.steps // 10)])
    if code != 0 or args.no_serve:
        return code
    print(f"serving {args.adapters} (Ctrl-C to stop)", flush=True)
    return subprocess.call([sys.executable, "-m", "serving.cli", "--adapters", args.adapters])


if __name__ == "__main__":
    sys.exit(main())
