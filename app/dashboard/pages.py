"""The read-only pages: overview, search, user inspector, item page, and the static assets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.api.errors import ApiError
from app.api.schemas import _printable
from app.dashboard import charts, queries, service
from app.dashboard.web import HEADERS, HERE, PREFIX, Session, enabled, page, redirect
from app.db import items as catalogue
from app.db import registry

router = APIRouter(prefix=PREFIX, include_in_schema=False)
STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
METRICS = ("ndcg@10", "recall@10", "hitrate@10", "ndcg@20", "recall@20", "coverage@10")
COUNTS_SECONDS = 30.0


def _valid_id(value: str) -> bool:
    try:
        _printable(value)
    except ValueError:
        return False
    return 1 <= len(value) <= 256


def _not_found(request: Request, message: str) -> Response:
    return page(request, "message.html", {"title": "Not found", "message": message}, status=404)


def field(mapping: Any, *keys: str) -> dict[str, Any]:
    """``mapping[k1][k2]...`` as a dict, or {} wherever a key is missing or not a mapping (old checkpoints,
    hand-registered versions)."""
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    return mapping if isinstance(mapping, dict) else {}


def held_out(metrics: Any) -> dict[str, Any]:
    """The run's held-out metrics (each user's newest 20%); older runs recorded them as "test"."""
    return field(metrics, "held_out") or field(metrics, "test")


def with_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A registry row with its gate, held-out and most-popular figures as dicts, for the templates."""
    return {**row, "gate": field(row, "metrics", "gate"), "test": held_out(row.get("metrics")),
            "baseline": field(row, "metrics", "most_popular")}


def compare(metrics: Any) -> list[dict[str, Any]]:
    """Held-out metrics of the model against the most-popular baseline of the same run."""
    test, pop = held_out(metrics), field(metrics, "most_popular")
    rows = []
    for name in METRICS:
        m, p = test.get(name), pop.get(name)
        if m is None and p is None:
            continue
        ratio = m / p if isinstance(m, int | float) and isinstance(p, int | float) and p else None
        rows.append({"metric": name, "model": m, "most_popular": p, "ratio": ratio})
    return rows


def _served(request: Request) -> dict[str, Any] | None:
    model = request.app.state.holder.current
    if model is None:
        return None
    manifest = model.ckpt.manifest
    return {
        "version": model.version,
        "created_at": manifest.get("created_at"),
        "watermark": manifest.get("watermark"),
        "n_users": manifest.get("n_users"),
        "n_items": manifest.get("n_items"),
        "sampler": field(manifest, "config", "sampler"),
        "load_seconds": model.load_seconds,
        "compare": compare(manifest.get("metrics")),
    }


def _overview_data(request: Request) -> dict[str, Any]:
    state = request.app.state

    def counts() -> dict[str, Any]:
        with state.engine.connect() as conn:
            return {"counts": queries.counts(conn), "hours": queries.events_per_hour(conn)}

    data = state.dashboard.cached("overview", COUNTS_SECONDS, counts)
    with state.engine.connect() as conn:
        runs = [with_metrics(r) for r in registry.list_versions(conn)[:10]]
    return {**data, "runs": runs}


@router.get("")
async def overview(request: Request, session: Session) -> Response:
    data = await run_in_threadpool(_overview_data, request)
    hours = data["hours"]
    chart = charts.bar_chart(
        f"Events per hour, {len(hours) // 24} days to {_day_label(hours[-1][0]) if hours else '—'} (UTC)",
        [(_hour_label(t), float(n)) for t, n in hours],
        ticks={i: _day_label(t)[5:] for i, (t, _) in enumerate(hours) if t % 86400 == 0},
    )
    return page(
        request,
        "overview.html",
        {
            "served": _served(request),
            "refused": dict(request.app.state.holder.refused),
            "counts": data["counts"],
            "events_chart": chart,
            "events_in_window": sum(n for _, n in hours),
            "traffic": request.app.state.dashboard.traffic.summary(),
            "runs": data["runs"],
        },
    )


def _hour_label(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:00")


def _day_label(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


@router.get("/search")
def search(request: Request, session: Session, q: Annotated[str, Query(max_length=256)] = "") -> Response:
    """An exact user (then item) id opens its page; otherwise ids that start with the text are listed."""
    q = q.strip()
    if not q or not _valid_id(q):
        return page(request, "search.html", {"q": q, "users": [], "items": []})
    with request.app.state.engine.connect() as conn:
        users, items = queries.find_ids(conn, q)
    if q in users:
        return redirect(f"{PREFIX}/users/{quote(q, safe='')}")
    if q in items:
        return redirect(f"{PREFIX}/items/{quote(q, safe='')}")
    return page(request, "search.html", {"q": q, "users": users, "items": items})


def _call(fn: Any, *args: Any, **kw: Any) -> tuple[Any, str | None]:
    """A service call's answer, or its error message for the page (the page still renders)."""
    try:
        return fn(*args, **kw), None
    except ApiError as exc:
        return None, exc.message


def _score_groups(positives: np.ndarray, negatives: list[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    groups: dict[str, list[float]] = {}
    for neg in negatives:
        groups.setdefault(str(neg.get("source", "?")), []).append(float(neg.get("score", np.nan)))
    return [("positives", positives.tolist()), *sorted(groups.items())]


def _user_data(request: Request, user_id: str, strategy: str, n: int, seed: int) -> dict[str, Any]:
    state = request.app.state
    with state.engine.connect() as conn:
        profile = catalogue.get_user(conn, user_id)
        total, history = queries.user_history(conn, user_id)
    model = state.holder.current
    recs, recs_error = _call(service.recommendations, request, user_id)
    negs, negs_error = _call(service.negatives, request, user_id, strategy, n, seed)
    chart = None
    if negs is not None:
        summary = field(negs, "summary")
        mean_pos, margin = summary.get("mean_positive_score"), summary.get("easy_margin")
        marker = (mean_pos - margin, "easy below") if mean_pos is not None and margin is not None else None
        chart = charts.distribution_chart(
            f"Scores of {user_id}'s positives and of each source's negatives ({negs.get('strategy')})",
            _score_groups(service.positive_scores(request, user_id), negs.get("negatives") or []),
            marker=marker,
        )
    return {
        "user_id": user_id, "profile": profile, "history": history, "history_total": total,
        "in_model": model is not None and model.user_row(user_id) is not None,
        "recs": recs, "recs_error": recs_error, "negs": negs, "negs_error": negs_error, "chart": chart,
        "strategies": service.STRATEGIES, "strategy": strategy, "n": n, "seed": seed,
    }


@router.get("/users/{user_id:path}")
async def user_page(
    request: Request,
    session: Session,
    user_id: str,
    strategy: Annotated[str, Query(max_length=32)] = service.STRATEGIES[0],
    n: Annotated[int, Query(ge=1, le=500)] = 50,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1)] = 0,
) -> Response:
    if not _valid_id(user_id):
        return _not_found(request, "A user id is 1–256 printable characters.")
    if strategy not in service.STRATEGIES:
        strategy = service.STRATEGIES[0]
    data = await run_in_threadpool(_user_data, request, user_id, strategy, n, seed)
    if data["profile"] is None and not data["in_model"]:
        return _not_found(request, f"No user {user_id!r} in the database or the served model.")
    return page(request, "user.html", data)


def _item_data(request: Request, item_id: str) -> dict[str, Any]:
    state = request.app.state
    with state.engine.connect() as conn:
        info = catalogue.get_item(conn, item_id)
        activity = queries.item_activity(conn, item_id)
    model = state.holder.current
    row = model.item_row(item_id) if model is not None else None
    similar, similar_error = _call(service.similar, request, item_id) if row is not None else (None, None)
    per_day = activity["per_day"]
    chart = charts.bar_chart(
        f"Events per day, {len(per_day)} days to {_day_label(per_day[-1][0]) if per_day else '—'}",
        [(_day_label(t), float(v)) for t, v in per_day],
        ticks={i: _day_label(t)[5:] for i, (t, _) in enumerate(per_day) if i % 10 == 0},
    )
    return {
        "item_id": item_id, "info": info, "activity": activity, "chart": chart, "in_model": row is not None,
        "popularity": int(model.ckpt.item_popularity[row]) if row is not None else None,
        "similar": similar, "similar_error": similar_error,
    }


@router.get("/items/{item_id:path}")
async def item_page(request: Request, session: Session, item_id: str) -> Response:
    if not _valid_id(item_id):
        return _not_found(request, "An item id is 1–256 printable characters.")
    data = await run_in_threadpool(_item_data, request, item_id)
    if data["info"] is None and not data["in_model"]:
        return _not_found(request, f"No item {item_id!r} in the database or the served model.")
    return page(request, "item.html", data)


_ASSETS = {name: (HERE / "static" / name).read_bytes() for name in STATIC}


@router.get("/static/{name}", dependencies=[Depends(enabled)])
def static(name: str) -> Response:
    """The stylesheet and the script, from the package (no session needed: the sign-in page uses them)."""
    if name not in _ASSETS:
        raise ApiError(404, "not_found", f"no asset {name!r}")
    headers = {**HEADERS, "Cache-Control": "public, max-age=3600"}
    return Response(_ASSETS[name], media_type=STATIC[name], headers=headers)
