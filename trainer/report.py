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


def _selection(hist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h for h in hist if h.get("phase", "selection") == "selection"] or hist


def sources_table(histories: dict[str, list[dict[str, Any]]]) -> str:
    """Per strategy and negative source: informative and false-negative rates in the first and last
    selection epoch (is a source still teaching anything, and how often is it a user's next item?)."""
    lines = ["| strategy | source | share of negatives | informative, epoch 1 → last | false negatives, epoch 1 → last |",
             "|---|---|---:|---:|---:|"]
    for name, hist in histories.items():
        sel = _selection(hist)
        first, last = sel[0].get("sources", {}), sel[-1].get("sources", {})
        total = sum(v.get("negatives", 0) for v in last.values()) or 1
        for source, v in last.items():
            f = first.get(source, {})

            def trend(key: str, f: dict[str, Any] = f, v: dict[str, Any] = v) -> str:
                a, b = f.get(key), v.get(key)
                return "–" if b is None else (f"{a:.2%} → {b:.2%}" if a is not None else f"{b:.2%}")

            lines.append(f"| {name} | {source} | {v.get('negatives', 0) / total:.1%} | {trend('informative_rate')} "
                         f"| {trend('false_negative_rate')} |")
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
        ("sources.informative_rate", "informative-negative rate per source", "source_informative_rate.png"),
        ("sources.false_negative_rate", "false-negative rate per source", "source_false_negative_rate.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, hist in histories.items():
            for label, points in _series(name, _selection(hist), key):
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
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


def _series(name: str, sel: list[dict[str, Any]], key: str) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(epoch, value)]) lines: one per strategy, or per strategy and source for "sources.<key>"."""
    if not key.startswith("sources."):
        points = [(h["epoch"], h[key]) for h in sel if key in h]
        return [(name, points)] if points else []
    field = key.split(".", 1)[1]
    by_source: dict[str, list[tuple[int, float]]] = {}
    for h in sel:
        for source, v in h.get("sources", {}).items():
            if field in v:
                by_source.setdefault(source, []).append((h["epoch"], v[field]))
    return [(f"{name}: {source}", points) for source, points in by_source.items()]
