"""Quality and cost of `recsys train` with its defaults against the strongest peers, on real catalogues.

For each data set in ../shared/datasets (never copied into the repo) the benchmark splits the events
by the protocol (bench/protocol.py, written independently of the trainer), writes the train split to a
file and runs exactly what README tells a user to run: `recsys train --events FILE` (defaults; other
rows add one flag each), then `recsys recommend --all` on the checkpoint it wrote. The served lists are
scored against the held-out test split. Peers (bench/peers.py: most-popular, iALS, EASE, LightFM WARP)
run on the same split in the same run, their hyper-parameters chosen on a validation split of the train
split. The project's rows are the mean of several seeds. Prints a Markdown table (NDCG@10 and its ratio to
the best peer, wall time) and writes JSON.

    .venv/bin/pip install -e '.[bench]'                                # iALS (implicit); LightFM: see pyproject
    .venv/bin/python bench/quality.py                                  # all four data sets, 3 seeds
    .venv/bin/python bench/quality.py --datasets ml-100k --seeds 0 --rows default
    .venv/bin/python bench/quality.py --datasets gowalla+yelp2018 --seeds 0 --peers iALS  # a larger catalogue
    .venv/bin/python bench/quality.py --rows default,hard --peers iALS # fewer peers, a hard-negative row
    .venv/bin/python bench/quality.py --row "dim 128=--dim 128"        # an experiment beside the default
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from machine import describe  # noqa: E402
from protocol import Split, score, split  # noqa: E402

from app.eventfiles import read_event_file  # noqa: E402

DATASETS = {"ml-100k": "ml-100k/u.data", "ml-latest-small": "ml-latest-small/ratings.csv",
            "gowalla": "gowalla/interactions.csv", "yelp2018": "yelp2018/interactions.csv"}
# a larger catalogue than any one set here (72.6k items): two sets in one file, their ids kept apart;
# not in the default run (the peers' grids take most of an hour on it)
COMBINED = {"gowalla+yelp2018": ("gowalla", "yelp2018")}
# row name -> extra `recsys train` flags (the default row has none: it is what a user gets)
ROWS = {
    "default": [],
    "whole history": ["--history-cap", "0"],
    "free vectors": ["--tower", "free"],
    "pooled + free": ["--tower", "both"],
    "hard": ["--strategy", "hard"],
    "uniform": ["--strategy", "uniform"],
    "popularity": ["--strategy", "popularity"],
    "in-batch": ["--strategy", "in-batch"],
    "in-batch without logQ": ["--strategy", "in-batch", "--no-logq"],
}
RECSYS = [sys.executable, "-m", "app.cli"]


def run_ours(sp: Split, train_file: Path, work: Path, flags: list[str], seed: int) -> dict:
    """`recsys train` on the train split, `recsys recommend --all`, the lists scored under the protocol."""
    out = work / f"ckpt-{seed}"
    recs = work / f"recs-{seed}.csv"
    env = {**os.environ, "RECSYS_DATA_DIR": str(work / "var")}
    t = time.perf_counter()
    subprocess.run([*RECSYS, "train", "--events", str(train_file), "--out", str(out), "--seed", str(seed), *flags],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t
    subprocess.run([*RECSYS, "recommend", "--checkpoint", str(out), "--all", "--k", "20", "--no-database",
                    "--out", str(recs)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    lists: dict[str, list[str]] = {}
    with recs.open() as f:
        for row in csv.DictReader(f):
            lists.setdefault(row["user_id"], []).append(row["item_id"])
    manifest = json.loads(next(out.rglob("manifest.json")).read_text())
    return {"metrics": score(lists, sp), "train_s": round(train_s, 2),
            "held_out": manifest.get("metrics", {}).get("held_out", {}).get("ndcg@10"),
            "epochs": manifest.get("metrics", {}).get("best_epoch")}


def load(name: str, root: Path) -> pd.DataFrame:
    """A data set's events; a combined one's parts with each id prefixed by its part's name."""
    if name in DATASETS:
        return read_event_file(root / DATASETS[name])
    parts = [read_event_file(root / DATASETS[part]) for part in COMBINED[name]]
    return pd.concat([e.assign(user_id=f"{part}:" + e["user_id"], item_id=f"{part}:" + e["item_id"])
                      for part, e in zip(COMBINED[name], parts, strict=True)], ignore_index=True)


def bench_dataset(name: str, args: argparse.Namespace) -> dict:
    events = load(name, Path(args.data_root))
    sp = split(events)
    res: dict = {"events": len(events), "train_events": len(sp.train), "test_users": len(sp.test),
                 "items": len(sp.catalogue), "peers": {}, "rows": {}}
    for peer in args.peers:
        r = peers.run_peer(peer, sp)
        res["peers"][peer] = {"metrics": r.metrics, "params": r.params, "fit_s": r.fit_seconds, "note": r.note}
        shown = f"NDCG@10 {r.metrics['ndcg@10']:.4f} fit {r.fit_seconds:.1f}s {r.params}" if r.metrics else r.note
        print(f"{name} {peer}: {shown}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"quality-{name}-") as tmp:
        work = Path(tmp)
        train_file = work / "train.csv"
        peers.train_frame(sp).to_csv(train_file, index=False)
        for row in args.rows:
            runs = []
            for seed in args.seeds:
                runs.append(run_ours(sp, train_file, work / row.replace(" ", "_").replace(",", ""), ROWS[row], seed))
                print(f"{name} {row} seed {seed}: NDCG@10 {runs[-1]['metrics']['ndcg@10']:.4f} "
                      f"in {runs[-1]['train_s']:.1f}s", file=sys.stderr, flush=True)
            ndcg = [r["metrics"]["ndcg@10"] for r in runs]
            res["rows"][row] = {"runs": runs, "ndcg@10": statistics.mean(ndcg),
                                "ndcg@10_sd": statistics.pstdev(ndcg),
                                "recall@10": statistics.mean(r["metrics"]["recall@10"] for r in runs),
                                "coverage@10": statistics.mean(r["metrics"]["coverage@10"] for r in runs),
                                "train_s": statistics.median(r["train_s"] for r in runs)}
    return res


def table(results: dict) -> str:
    lines = ["| data set | items | " + " | ".join(["most-popular", "iALS", "EASE", "LightFM WARP"]) +
             " | best peer | `recsys train` rows (NDCG@10 ± sd, × best peer, wall s) |",
             "|---|---:|" + "---:|" * 4 + "---|---|"]
    for name, r in results["datasets"].items():
        cells = []
        best_name, best = None, -1.0
        for peer in ("most-popular", "iALS", "EASE", "LightFM WARP"):
            m = r["peers"].get(peer, {}).get("metrics")
            cells.append(f"{m['ndcg@10']:.4f} ({r['peers'][peer]['fit_s']:.1f}s)" if m else "–")
            if m and peer != "most-popular" and m["ndcg@10"] > best:
                best_name, best = peer, m["ndcg@10"]
        ours = "; ".join(f"{row}: {x['ndcg@10']:.4f} ± {x['ndcg@10_sd']:.4f}, "
                         f"{x['ndcg@10'] / best:.2f}x, {x['train_s']:.1f}s" if best > 0 else f"{row}: {x['ndcg@10']:.4f}"
                         for row, x in r["rows"].items())
        lines.append(f"| {name} | {r['items']:,} | " + " | ".join(cells) + f" | {best_name or '–'} | {ours} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated, of {', '.join([*DATASETS, *COMBINED])}")
    p.add_argument("--rows", default="default", help=f"comma-separated: {', '.join(ROWS)}")
    p.add_argument("--row", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra row: NAME, then the `recsys train` flags it adds (repeatable)")
    p.add_argument("--peers", default=",".join(peers.PEERS), help="comma-separated; '' for none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.rows = [r for r in args.rows.split(",") if r]
    for extra in args.row:
        name, _, flags = extra.partition("=")
        ROWS[name] = flags.split()
        args.rows.append(name)
    args.peers = [x for x in args.peers.split(",") if x]
    unknown = ([r for r in args.rows if r not in ROWS] + [x for x in args.peers if x not in peers.PEERS]
               + [d for d in args.datasets.split(",") if d not in DATASETS and d not in COMBINED])
    if unknown:
        p.error(f"unknown rows, peers or data sets: {unknown}")
    results = {"seeds": args.seeds, "machine": describe(), "datasets": {}}
    for name in args.datasets.split(","):
        results["datasets"][name] = bench_dataset(name, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
