"""Fresh user vectors (source ``model+recent``): do lists follow what a known user just did, without retraining?

Two measurements, both through the serving core in-process (``Recommender.recommend`` on a loaded
checkpoint, the user's events since the watermark handed over as the in-memory view would):

1. *Cluster shift* on a synthetic log (``trainer.synth``): users of one planted cluster whose top-10 holds
   almost nothing (< 10%) of the next cluster like 3 items of it; the share of that cluster in their next
   top-10, static list (today: the new items only leave the list) against the fresh vector.
2. *Replay* on ml-latest-small (``--parts gowalla``: on gowalla) under the protocol (bench/protocol.py's split and scorer): a model trained
   on the train split; each test user's held-out events in time order, the first half posted as live
   events, the second half ranked; NDCG@10 of the static list (first half excluded) against the fresh
   vector, for each ``--weights`` (RECSYS_FRESH_WEIGHT).
3. *Dislikes* (``--parts dislikes``, pooled tower): the same replay with the live ratings of 2 or less
   posted as dislikes (the service never serves them; they move no vector unless they were positives),
   against pushing their neighbours down: ``λ·w·Σ c_j`` of the disliked items subtracted from the pooled
   sum (an experiment here, not what the service does). Targets are the protocol's (every held-out event).

    python bench/fresh.py --threads 1            # both parts, pooled and free towers
    python bench/fresh.py --parts synthetic      # the quick part only
    python bench/fresh.py --parts dislikes       # the push-down experiment
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from protocol import Split, _sort_key, score, split  # noqa: E402

from app.eventfiles import read_event_file  # noqa: E402
from app.serving.model import ServedModel, load_model  # noqa: E402
from app.serving.recommender import Ask, History, Recommender, UserVector  # noqa: E402
from trainer import towers  # noqa: E402
from trainer.synth import SynthSpec, generate  # noqa: E402

SYNTH = SynthSpec(users=400, items=300, events=12_000, seed=11)
ML = "ml-latest-small/ratings.csv"
REPLAYS = {"ml-latest-small": ML, "gowalla": "gowalla/interactions.csv"}  # data sets the replay part runs on


class Replay:
    """The in-memory view's answer for each user: their live events, all positive (or all negative)."""

    def __init__(self) -> None:
        self.live: dict[str, list[str]] = {}
        self.disliked: dict[str, list[str]] = {}

    def events_for(self, user_id: str, watermark: int) -> tuple[list[str], list[str], list[str]]:
        pos, neg = self.live.get(user_id, []), self.disliked.get(user_id, [])
        return [*pos, *neg][::-1], pos[::-1], neg[::-1]


def train(frame: pd.DataFrame, out: Path, tower: str, threads: int, epochs: int | None) -> ServedModel:
    """The trainer's pipeline with its defaults (``recsys train``), loaded as the service loads it."""
    from trainer.config import TrainConfig
    from trainer.pipeline import run, save

    kw = {} if epochs is None else {"epochs": epochs}
    cfg = TrainConfig(progress=False, threads=threads, seed=0, tower=tower, **kw)
    t = time.perf_counter()
    path = save(run(frame, cfg, watermark=10**12), out)
    print(f"trained {tower} in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return load_model(path, wait=True)


def lists(model: ServedModel, rec: Recommender, users: list[str], k: int = 10) -> dict[str, list[str]]:
    out = {}
    for user in users:
        answer = rec.recommend(model, Ask(user, k))
        assert answer is not None
        out[user] = answer.item_ids
    return out


def cluster_shift(model: ServedModel, frame: pd.DataFrame, weights: list[int], liked: int = 3) -> dict:
    """Mean share of the target cluster in the top-10 of users who liked ``liked`` of its items."""
    uc, ic = frame.attrs["user_cluster"], frame.attrs["item_cluster"]
    k = int(ic.max()) + 1
    seen = frame.groupby("user_id")["item_id"].agg(set)
    view = Replay()
    static = Recommender(None, (), recent=view)
    rng = np.random.default_rng(0)
    chosen: dict[str, list[str]] = {}
    for user in model.ckpt.user_ids:
        target = (uc[int(user[1:])] + 1) % k
        before = lists(model, static, [user])[user]
        if np.mean([ic[int(i[1:])] == target for i in before]) >= 0.1:
            continue
        fresh = [f"i{j}" for j in np.flatnonzero(ic == target) if f"i{j}" not in seen[user]]
        chosen[user] = [str(i) for i in rng.choice(fresh, liked, replace=False)]
    view.live = chosen

    def share(rec: Recommender) -> float:
        got = lists(model, rec, list(chosen))
        return float(np.mean([np.mean([ic[int(i[1:])] == (uc[int(u[1:])] + 1) % k for i in got[u]]) for u in got]))

    out = {"users": len(chosen), "before": 0.0, "static": share(Recommender(None, (), recent=_Touched(view)))}
    view.live = {}
    out["before"] = share(static)
    view.live = chosen
    for w in weights:
        out[f"fresh w={w}"] = share(Recommender(None, (), recent=view, fresh_weight=w))
    return out


class _Touched:
    """Today's behaviour: the live items are only excluded (the view knew no event types)."""

    def __init__(self, view: Replay) -> None:
        self.view = view

    def events_for(self, user_id: str, watermark: int) -> tuple[list[str], list[str], list[str]]:
        return self.view.events_for(user_id, watermark)[0], [], []


def halves(events: pd.DataFrame, sp: Split) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Each test user's held-out items in time order (the protocol's order), split in two halves."""
    ev = events.assign(user_id=events["user_id"].astype(str), item_id=events["item_id"].astype(str))
    ev = ev.assign(_k=_sort_key(ev["item_id"])).sort_values(["user_id", "timestamp", "_k"], kind="stable")
    ev = ev[~ev.duplicated(["user_id", "item_id"])]
    first: dict[str, list[str]] = {}
    second: dict[str, set[str]] = {}
    for user, items in ev.groupby("user_id", sort=False)["item_id"]:
        held = [i for i in items if i in sp.test.get(user, ())]
        if len(held) >= 2:
            first[user], second[user] = held[: len(held) // 2], set(held[len(held) // 2 :])
    return first, second


def replay(model: ServedModel, events: pd.DataFrame, sp: Split, weights: list[int]) -> dict:
    """NDCG@10 on the second half of each test user's held-out events, the first half replayed live."""
    first, second = halves(events, sp)
    users = [u for u in first if model.user_row(u) is not None]
    own = {u: sp.train_items.get(u, set()) | set(first.get(u, ())) for u in users}
    target = Split(sp.train, {u: second[u] for u in users}, own, sp.catalogue)
    view = Replay()
    view.live = first
    out: dict = {"users": len(users)}
    t = time.perf_counter()
    out["static"] = score(lists(model, Recommender(None, (), recent=_Touched(view)), users), target)
    out["static_ms"] = 1000 * (time.perf_counter() - t) / len(users)
    for w in weights:
        t = time.perf_counter()
        out[f"fresh w={w}"] = score(lists(model, Recommender(None, (), recent=view, fresh_weight=w), users), target)
        out[f"fresh w={w}_ms"] = 1000 * (time.perf_counter() - t) / len(users)
    return out


def _cell(v: dict | float) -> str:
    return f"{v['ndcg@10']:.4f}" if isinstance(v, dict) else f"{v:.3f}"


class PushDown(Recommender):
    """The service's fresh vector, and the disliked items' pooled vectors subtracted ``lam`` times."""

    def __init__(self, lam: float, **kw: object) -> None:
        super().__init__(None, (), **kw)  # type: ignore[arg-type]
        self.lam = lam

    def user_vector(self, model: ServedModel, row: int | None, history: History) -> UserVector:
        disliked = np.asarray(model.rows_of(history.negatives), dtype=np.int64)
        if row is None or not disliked.size or not model.pooled or model.tower.free:
            return super().user_vector(model, row, history)
        added, removed = self.changes(model, row, history)
        held = np.setdiff1d(model.positive_rows(row).astype(np.int64), np.asarray(removed, dtype=np.int64))
        table = model.ckpt.history_embeddings
        w = self.fresh_weight
        v = towers.pool(table, np.concatenate([held, np.repeat(np.asarray(added, dtype=np.int64), w)]), 0.0)
        v = v - self.lam * towers.pool(table, np.repeat(disliked, w), 0.0)
        return UserVector(towers.finish(model.tower, v), "model+recent")


def dislikes(model: ServedModel, events: pd.DataFrame, sp: Split, lams: list[float], w: int = 10) -> dict:
    """The replay with live ratings <= 2 as dislikes: the service's vector against pushing them down."""
    first, second = halves(events, sp)
    users = [u for u in first if model.user_row(u) is not None]
    own = {u: sp.train_items.get(u, set()) | set(first.get(u, ())) for u in users}
    target = Split(sp.train, {u: second[u] for u in users}, own, sp.catalogue)
    low = set(map(tuple, events.loc[events["value"] <= 2, ["user_id", "item_id"]].astype(str).to_numpy()))
    view = Replay()
    view.live = {u: [i for i in first[u] if (u, i) not in low] for u in users}
    view.disliked = {u: [i for i in first[u] if (u, i) in low] for u in users}
    out: dict = {"users": len(users), "with_dislikes": sum(bool(v) for v in view.disliked.values())}
    as_positive = Replay()
    as_positive.live = first
    out["all positive"] = score(lists(model, Recommender(None, (), recent=as_positive, fresh_weight=w), users), target)
    for lam in [0.0, *lams]:
        out[f"push λ={lam}"] = score(lists(model, PushDown(lam, recent=view, fresh_weight=w), users), target)
    return out


def table(results: dict) -> str:
    lines = []
    if set(results["parts"]) - {"dislikes"}:
        lines += ["| part | tower | users | static | " + " | ".join(f"fresh w={w}" for w in results["weights"]) + " |",
                  "|---|---|---|---|" + "---|" * len(results["weights"])]
    for part, per_tower in results["parts"].items():
        if part == "dislikes":
            names = [k for k, v in per_tower.items() if isinstance(v, dict)]
            lines += ["", "| dislikes | users | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            lines.append(f"| pooled | {per_tower['users']} ({per_tower['with_dislikes']} with dislikes) | "
                         + " | ".join(_cell(v) for k, v in per_tower.items() if isinstance(v, dict)) + " |")
            continue
        for tower, r in per_tower.items():
            fresh = " | ".join(_cell(r[f"fresh w={w}"]) for w in results["weights"])
            before = f" (before: {r['before']:.3f})" if "before" in r else ""
            lines.append(f"| {part} | {tower} | {r['users']} | {_cell(r['static'])}{before} | {fresh} |")
    return "\n".join(lines)


def run_part(part: str, args: argparse.Namespace, tmp: Path) -> dict:
    """One part's figures (per tower, except for ``dislikes``), each model trained afresh in ``tmp``."""
    if part == "synthetic":
        frame = generate(SYNTH)
        return {tower: cluster_shift(train(frame, tmp / f"synth-{tower}", tower, args.threads, args.synthetic_epochs),
                                     frame, args.weights) for tower in args.towers}
    events = read_event_file(Path(args.data_root) / REPLAYS.get(part, ML))
    sp = split(events)
    if part == "dislikes":
        return dislikes(train(sp.train, tmp / "ml-dislikes", "pooled", args.threads, None), events, sp, [0.25, 0.5, 1.0])
    return {tower: replay(train(sp.train, tmp / f"ml-{tower}", tower, args.threads, None), events, sp, args.weights)
            for tower in args.towers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["synthetic", "ml-latest-small"],
                   choices=["synthetic", *REPLAYS, "dislikes"])
    p.add_argument("--towers", nargs="+", default=["pooled", "free"])
    p.add_argument("--weights", nargs="+", type=int, default=[1, 3, 10, 30])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--synthetic-epochs", type=int, default=8)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fresh.json"))
    args = p.parse_args()
    results: dict = {"weights": args.weights, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="fresh-") as tmp:
        for part in args.parts:
            results["parts"][part] = run_part(part, args, Path(tmp))
            print(json.dumps({part: results["parts"][part]}, default=str), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
