"""PNG plots for the report: the Pareto picture (perplexity vs bytes for
every artifact and anchor) and decode speed per backend against its bound."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402


def pareto_plot(points: list[dict], path: Path) -> None:
    """`points`: {label, bytes, perplexity, anchor}."""
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colors = plt.get_cmap("tab10")
    # a legend, not annotations: artifacts of one output sit at the same size
    for i, point in enumerate(sorted(points, key=lambda p: (p["anchor"], p["bytes"]))):
        ax.scatter(point["bytes"] / 1e6, point["perplexity"], marker="s" if point["anchor"] else "o",
                   color=colors(i % 10), s=50, zorder=3, label=point["label"] + (" [anchor]" if point["anchor"] else ""))
    if points:  # a bench run without perplexities has nothing to label
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("bytes on disk (MB)")
    ax.set_ylabel("perplexity (WikiText-2 test, 512-token windows)")
    ax.set_title("Quality vs size\n(circles: factorport artifacts, squares: anchors)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_plot(runs: list[dict], path: Path) -> None:
    """Decode tokens/s per run (median, min–max) beside its bandwidth bound."""
    runs = [r for r in runs if "decode_tokens_per_s" in r]
    labels = [f"{r['label'].replace(' (', chr(10) + '(')}\n[{r['backend']}]" for r in runs]
    medians = [r["decode_tokens_per_s"]["median"] for r in runs]
    errors = [
        [m - r["decode_tokens_per_s"]["min"] for m, r in zip(medians, runs)],
        [r["decode_tokens_per_s"]["max"] - m for m, r in zip(medians, runs)],
    ]
    bounds = [r["bound_tokens_per_s"] for r in runs]
    x = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * len(runs)), 5.2))
    ax.bar([i - 0.2 for i in x], medians, width=0.4, yerr=errors, capsize=3, label="decode tok/s (median, min–max)",
           color=["tab:gray" if r["anchor"] else "tab:blue" for r in runs])
    ax.bar([i + 0.2 for i in x], bounds, width=0.4, label="bound: bandwidth / bytes read per token", color="none", edgecolor="tab:red", hatch="//")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title("Decode at batch 1 against its memory-bandwidth bound\n(gray: anchors)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
