"""Render strategy comparisons: a Markdown table and PNG plots of the per-epoch diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS = ("ndcg@10", "recall@10", "hitrate@10", "ndcg@20", "recall@20", "coverage@10")


def metric_table(rows: list[tuple[str, dict[str, float], float | None]]) -> str:
    """Markdown table: one row per (name, metrics, seconds)."""
    head = "| model | " + " | ".join(METRICS) + " | train s |"
    sep = "|---|" + "---:|" * (len(METRICS) + 1)
    lines = [head, sep]
    for name, m, seconds in rows:
        cells = " | ".join(f"{m.get(k, float('nan')):.4f}" for k in METRICS)
        lines.append(f"| {name} | {cells} | {'' if seconds is None else f'{seconds:.1f}'} |")
    return "\n".join(lines)


def diagnostics_table(histories: dict[str, list[dict[str, Any]]]) -> str:
    """Last selection epoch of each strategy: the sampling diagnostics side by side."""
    cols = ("mean_pos_score", "mean_neg_score", "informative_rate", "false_negative_rate", "sampling_share",
            "events_per_s")
    lines = ["| strategy | epochs | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, hist in histories.items():
        sel = [h for h in hist if h.get("phase", "selection") == "selection"] or hist
        last = sel[-1]
        lines.append(f"| {name} | {len(sel)} | " + " | ".join(f"{float(last.get(c, float('nan'))):.4g}" for c in cols)
                     + " |")
    return "\n".join(lines)


def plot_histories(histories: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Validation NDCG@10, mean negative score and informative rate per epoch, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title, fname in (
        ("val_ndcg@10", "validation NDCG@10", "val_ndcg.png"),
        ("mean_neg_score", "mean negative score (logits)", "neg_score.png"),
        ("informative_rate", "informative-negative rate", "informative_rate.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, hist in histories.items():
            sel = [h for h in hist if h.get("phase", "selection") == "selection" and key in h]
            if sel:
                ax.plot([h["epoch"] for h in sel], [h[key] for h in sel], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
