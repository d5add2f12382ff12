"""Pictures of a run: the final ranks (layers x module types) and how the ranks grew over the steps."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def split_name(module: str) -> tuple[str, str]:
    """'bert.encoder.layer.3.attention.self.query' -> ('3', 'attention.self.query')."""
    m = _LAYER.match(module)
    return (m.group(2), m.group(3)) if m else ("-", module)


def rank_table(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (layers), columns (module types) and ranks; NaN where a layer lacks a module type."""
    cells = {split_name(n): r for n, r in ranks.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    kinds = list(dict.fromkeys(k for _, k in cells))
    return layers, kinds, [[cells.get((layer, k), float("nan")) for k in kinds] for layer in layers]


def plot_rank_heatmap(ranks: dict[str, int], path: str | Path, title: str = "final ranks") -> Path:
    layers, kinds, table = rank_table(ranks)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 1.0 + 0.45 * len(layers)))
    im = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), [k.replace(".", ".\n") for k in kinds], fontsize=7)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    for i, row in enumerate(table):
        for j, r in enumerate(row):
            if r == r:  # not NaN
                ax.text(j, i, f"{r:g}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_rank_growth(initial: dict[str, int], history: list[dict], total_steps: int, budget: int,
                     path: str | Path) -> Path:
    """Total rank over the steps (top) and each module's rank, coloured by module type (bottom)."""
    ranks = dict(initial)
    series = {n: ([0], [r]) for n, r in ranks.items()}
    steps, totals = [0], [sum(ranks.values())]
    for e in history:
        ranks[e["module"]] = e["new_rank"]
        xs, ys = series[e["module"]]
        xs.append(e["step"])
        ys.append(e["new_rank"])
        steps.append(e["step"])
        totals.append(sum(ranks.values()))
    steps.append(total_steps)
    totals.append(totals[-1])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.step(steps, totals, where="post", label="total rank")
    top.axhline(budget, color="grey", ls="--", lw=1, label=f"budget {budget}")
    top.set_ylabel("total rank")
    top.legend(loc="lower right")
    colours = {}
    for name, (xs, ys) in series.items():
        kind = split_name(name)[1]
        colour = colours.setdefault(kind, f"C{len(colours) % 10}")
        bottom.step(xs + [total_steps], ys + [ys[-1]], where="post", color=colour, alpha=0.6, lw=1)
    for kind, colour in colours.items():
        bottom.plot([], [], color=colour, label=kind)
    bottom.legend(fontsize=7, loc="upper left")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("rank per module")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
