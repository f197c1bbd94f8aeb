"""A checkpoint's per-epoch diagnostics as charts and table rows, tolerant of whatever older checkpoints
lack: a key no epoch recorded gives no chart; a key some epochs lack leaves gaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from app.dashboard.charts import Series, line_chart

PHASES = {"selection": "selection", "all": "final fit", "final": "final fit"}
# (title, key in each epoch, key in each source or None: per-source series beside the overall one)
CHARTS: tuple[tuple[str, str | None, str | None], ...] = (
    ("Validation NDCG@10", "val_ndcg@10", None),
    ("Training loss", "loss", None),
    ("Informative-negative rate, per source", "informative_rate", "informative_rate"),
    ("False-negative rate, per source", "false_negative_rate", "false_negative_rate"),
    ("Mean negative score, per source (and positives)", "mean_neg_score", "mean_neg_score"),
    ("Sampling share of training time", "sampling_share", None),
)
TIMING = ("index_refresh_s", "hard_search_s")
COLUMNS = (
    "loss", "val_ndcg@10", "val_recall@10", "informative_rate", "false_negative_rate", "mean_pos_score",
    "mean_neg_score", "sampling_share", "index_refresh_s", "hard_search_s", "train_seconds",
)
SOURCE_COLUMNS = ("negatives", "mean_neg_score", "informative_rate", "false_negative_rate")


def _value(entry: Mapping[str, Any], key: str) -> float | None:
    v = entry.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _epochs(diagnostics: Sequence[Any]) -> list[Mapping[str, Any]]:
    return [d for d in diagnostics if isinstance(d, Mapping)]


def _sources(entry: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    sources = entry.get("sources")
    if not isinstance(sources, Mapping):
        return {}
    return {str(k): v for k, v in sources.items() if isinstance(v, Mapping)}


def _axis(epochs: list[Mapping[str, Any]]) -> tuple[dict[float, str], list[tuple[float, float, str]]]:
    """Tick labels (epoch numbers) and one band per training phase, over positions 1..N."""
    labels, bands = {}, []
    for pos, entry in enumerate(epochs, 1):
        labels[float(pos)] = str(entry.get("epoch", pos))
        phase = PHASES.get(str(entry.get("phase")), str(entry.get("phase") or ""))
        if bands and bands[-1][2] == phase:
            bands[-1] = (bands[-1][0], float(pos), phase)
        else:
            bands.append((float(pos), float(pos), phase))
    if len(labels) > 16:  # keep the axis readable: every n-th epoch
        step = -(-len(labels) // 16)
        labels = {x: t for i, (x, t) in enumerate(labels.items()) if i % step == 0}
    return labels, bands if len(bands) > 1 or (bands and bands[0][2]) else []


def charts(diagnostics: Sequence[Any]) -> list[Markup]:
    """The per-epoch charts this checkpoint has data for."""
    epochs = _epochs(diagnostics)
    if not epochs:
        return []
    labels, bands = _axis(epochs)
    names = sorted({name for e in epochs for name in _sources(e)})
    out = []
    for title, key, source_key in CHARTS:
        series = [Series("all negatives" if source_key else key, [(i, _value(e, key)) for i, e in enumerate(epochs, 1)])]
        if source_key:
            series += [
                Series(name, [(i, _value(_sources(e).get(name, {}), source_key)) for i, e in enumerate(epochs, 1)])
                for name in names
            ]
        if key == "mean_neg_score":
            series.append(Series("positives", [(i, _value(e, "mean_pos_score")) for i, e in enumerate(epochs, 1)]))
        series = [s for s in series if any(y is not None for _, y in s.points)]
        if series:
            out.append(line_chart(title, series, x_labels=labels, bands=bands,
                                  y_min=0.0 if key != "mean_neg_score" else None))
    timing = [Series(k, [(i, _value(e, k)) for i, e in enumerate(epochs, 1)]) for k in TIMING]
    timing = [s for s in timing if any(y is not None for _, y in s.points)]
    if timing:
        out.append(line_chart("Hard-negative index refresh and search (s)", timing, x_labels=labels, bands=bands,
                              y_min=0.0))
    return out


def table(diagnostics: Sequence[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The per-epoch columns any epoch recorded, and one row per epoch."""
    epochs = _epochs(diagnostics)
    columns = [c for c in COLUMNS if any(c in e for e in epochs)]
    rows = [{"phase": PHASES.get(str(e.get("phase")), e.get("phase")), "epoch": e.get("epoch"),
             **{c: e.get(c) for c in columns}} for e in epochs]
    return columns, rows


def source_table(diagnostics: Sequence[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per (epoch, negative source), with the columns any source recorded."""
    epochs = _epochs(diagnostics)
    rows = [
        {"phase": PHASES.get(str(e.get("phase")), e.get("phase")), "epoch": e.get("epoch"), "source": name,
         **{c: s.get(c) for c in SOURCE_COLUMNS}}
        for e in epochs
        for name, s in sorted(_sources(e).items())
    ]
    columns = [c for c in SOURCE_COLUMNS if any(r[c] is not None for r in rows)]
    return columns, rows
