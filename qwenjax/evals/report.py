"""Writing an eval's results: results.json (everything, per sample), results.md (tables) and PNGs.

Scores are in percent. Tasks with a depth axis get a depth x length heatmap each
(`heatmap_<task>.png`, the NIAH picture); every generation task appears in `summary.png`
(task x length); perplexity gets `perplexity.png` (nll against position, one line per length).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on TPU VMs or CI
import matplotlib.pyplot as plt


def length_label(n: int) -> str:
    """4096 -> "4K", 1048576 -> "1M", 300 -> "300"."""
    for size, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= size and n % (size // 8) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def _pct(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.0f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Long-context eval: {results['model']}", ""]
    tasks = results["tasks"]
    if tasks:
        lengths = results["lengths"]
        lines += [
            "## Summary (% correct)",
            "",
            "| task | " + " | ".join(length_label(n) for n in lengths) + " | mean |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for name, t in tasks.items():
            lines.append(
                f"| {name} | "
                + " | ".join(_pct(x) for x in t["by_length"])
                + f" | {_pct(t['mean'])} |"
            )
        lines.append("")
    for name, t in tasks.items():
        if t["depths"] is None:
            continue
        lines += [
            f"## {name} (% correct, {t['samples_per_cell']} samples a cell)",
            "",
            "| depth \\ length | " + " | ".join(length_label(n) for n in t["lengths"]) + " |",
            "|---" * (len(t["lengths"]) + 1) + "|",
        ]
        for d, row in zip(t["depths"], t["grid"]):
            lines.append(f"| {100 * d:.0f}% | " + " | ".join(_pct(x) for x in row) + " |")
        lines.append("| mean | " + " | ".join(_pct(x) for x in t["by_length"]) + " |")
        lines.append("")
    if results.get("perplexity"):
        lines += [
            "## Perplexity by position (nll in nats; buckets are equal ranges of each length)",
            "",
        ]
        for length, rows in results["perplexity"].items():
            lines += [
                f"length {length_label(int(length))}:",
                "",
                "| positions | " + " | ".join(f"{r['start']}-{r['end']}" for r in rows) + " |",
                "|---" * (len(rows) + 1) + "|",
                "| nll | " + " | ".join(f"{r['nll']:.3f}" for r in rows) + " |",
                "| ppl | " + " | ".join(f"{r['ppl']:.2f}" for r in rows) + " |",
                "",
            ]
    return "\n".join(lines)


def _heatmap(
    path: Path, grid: list[list[float]], rows: list[str], cols: list[str], title: str, ylabel: str
) -> None:
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.2 + 0.45 * len(rows)))
    data = [[float("nan") if x is None else 100 * x for x in r] for r in grid]
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, r in enumerate(data):
        for j, x in enumerate(r):
            if not math.isnan(x):
                ax.text(j, i, f"{x:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="% correct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    written = []
    tasks = results["tasks"]
    for name, t in tasks.items():
        if t["depths"] is not None:
            _heatmap(
                out / f"heatmap_{name}.png",
                t["grid"],
                [f"{100 * d:.0f}%" for d in t["depths"]],
                [length_label(n) for n in t["lengths"]],
                f"{name}: {results['model']}",
                "needle depth",
            )
            written.append(f"heatmap_{name}.png")
    if tasks:
        _heatmap(
            out / "summary.png",
            [t["by_length"] for t in tasks.values()],
            list(tasks),
            [length_label(n) for n in results["lengths"]],
            f"{results['model']}",
            "task",
        )
        written.append("summary.png")
    if results.get("perplexity"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for length, rows in results["perplexity"].items():
            ax.plot(
                [(r["start"] + r["end"]) / 2 for r in rows],
                [r["nll"] for r in rows],
                marker="o",
                label=length_label(int(length)),
            )
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("nll (nats / token)")
        ax.set_title(f"perplexity by position: {results['model']}")
        ax.legend(title="length")
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=120)
        plt.close(fig)
        written.append("perplexity.png")
    return written


def write_all(results: dict[str, Any], out: Path) -> list[str]:
    """results.json, results.md and the PNGs into the (existing) directory `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    return ["results.json", "results.md", *write_plots(results, out)]
