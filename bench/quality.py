"""Training quality and time of every negative-sampling strategy, with and without logQ, vs most-popular.

Runs the evaluation protocol on the MovieLens sets in ../shared/datasets (never copied into the repo),
averages a few seeds, prints a Markdown table and writes JSON. ``--scale`` instead times one epoch with
hard negatives on a 5M-event synthetic log (100k users, 50k items) and reports the index's share.

    .venv/bin/python bench/quality.py                       # MovieLens table -> bench/results/quality.json
    .venv/bin/python bench/quality.py --scale               # 5M-event timing -> bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.eventfiles import read_event_file as load_event_file  # noqa: E402
from trainer.data import build_dataset  # noqa: E402
from trainer.pipeline import run  # noqa: E402
from trainer.samplers import SamplerConfig  # noqa: E402
from trainer.train import TrainConfig, fit  # noqa: E402

DATASETS = {"ml-100k": "ml-100k/u.data", "ml-latest-small": "ml-latest-small/ratings.csv"}
STRATEGIES = ("uniform", "popularity", "in-batch", "hard", "mixed", "mixed+hard")
# strategy name -> sampler settings; "mixed+hard" adds FAISS hard negatives to the default mix
SAMPLERS = {"mixed+hard": {"strategy": "mixed", "mixed": ("in-batch", "uniform", "hard")}}


def quality(args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    out: dict = {"seeds": seeds, "datasets": {}}
    for name in args.datasets.split(","):
        path = Path(args.data_root) / DATASETS[name]
        data = build_dataset(load_event_file(path))
        rows: dict = {}
        baseline = None
        for strategy in strategies:
            for logq in (True, False):
                if strategy == "uniform" and not logq:
                    continue  # log(n·q) is one constant for every logit: identical to the corrected run
                key = f"{strategy}{'' if logq else ' (no logQ)'}"
                runs = []
                for seed in seeds:
                    cfg = TrainConfig(seed=seed, logq=logq, progress=False, threads=args.threads,
                                      sampler=SamplerConfig(**SAMPLERS.get(strategy, {"strategy": strategy})))
                    r = run(data, cfg)
                    baseline = r.baseline
                    runs.append({"ndcg@10": r.test["ndcg@10"], "recall@10": r.test["recall@10"],
                                 "hitrate@10": r.test["hitrate@10"], "coverage@10": r.test["coverage@10"],
                                 "seconds": r.seconds, "best_epoch": r.selection.best_epoch,
                                 "false_negative_rate": r.selection.history[-1]["false_negative_rate"]})
                    print(f"{name} {key} seed {seed}: NDCG@10 {r.test['ndcg@10']:.4f} in {r.seconds:.1f}s",
                          file=sys.stderr, flush=True)
                rows[key] = {"runs": runs, **{m: statistics.mean(x[m] for x in runs) for m in runs[0]},
                             "ndcg@10_sd": statistics.pstdev(x["ndcg@10"] for x in runs)}
        out["datasets"][name] = {"data": data.describe(), "most_popular": baseline, "strategies": rows}
    return out


def quality_table(res: dict) -> str:
    lines = []
    for name, d in res["datasets"].items():
        lines += [f"### {name} ({d['data']['users']} users, {d['data']['items']} items; mean of seeds {res['seeds']})",
                  "", "| strategy | NDCG@10 | ± sd | Recall@10 | HitRate@10 | Coverage@10 | FN rate | train s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in d["strategies"].items():
            lines.append(f"| {key} | {r['ndcg@10']:.4f} | {r['ndcg@10_sd']:.4f} | {r['recall@10']:.4f} | "
                         f"{r['hitrate@10']:.4f} | {r['coverage@10']:.4f} | {r['false_negative_rate']:.4f} | "
                         f"{r['seconds']:.1f} |")
        p = d["most_popular"]
        lines += [f"| most-popular | {p['ndcg@10']:.4f} | | {p['recall@10']:.4f} | {p['hitrate@10']:.4f} | "
                  f"{p['coverage@10']:.4f} | | |", ""]
    return "\n".join(lines)


def scale(args: argparse.Namespace) -> dict:
    from trainer.synth import SynthSpec, generate

    t = time.perf_counter()
    events = generate(SynthSpec(users=100_000, items=50_000, events=5_000_000, seed=0))
    data = build_dataset(events)
    del events
    prep = time.perf_counter() - t
    cfg = TrainConfig(epochs=1, hard_warmup_epochs=0, progress=False, threads=args.threads, val_max_users=2000,
                      batch_size=args.batch_size,
                      sampler=SamplerConfig(strategy="hard", index_type=args.index, refresh_every=args.refresh_every,
                                            hard_rows=args.hard_rows))
    h = fit(data, cfg).history[0]
    uniform = fit(data, replace(cfg, sampler=SamplerConfig(strategy="uniform"))).history[0]
    return {"events": 5_000_000, "data": data.describe(), "prepare_s": round(prep, 1), "index_type": args.index,
            "refresh_every": args.refresh_every, "batch_size": args.batch_size, "hard_rows": args.hard_rows,
            "threads": args.threads, "hard_epoch": {k: v for k, v in h.items() if k != "sources"},
            "uniform_epoch_s": uniform["train_seconds"],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON output (default bench/results/quality.json or scale.json)")
    p.add_argument("--scale", action="store_true", help="time one hard-negative epoch on a 5M-event log")
    p.add_argument("--index", default="auto", help="FAISS index for --scale: flat, ivf, hnsw, auto")
    p.add_argument("--refresh-every", type=int, default=SamplerConfig.refresh_every)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help="--scale: positives per batch (default: the trainer's)")
    p.add_argument("--hard-rows", type=int, default=SamplerConfig.hard_rows,
                   help="--scale: rows per batch given hard negatives (default: the trainer's)")
    args = p.parse_args()
    res = scale(args) if args.scale else quality(args)
    out = Path(args.out or ROOT / "bench" / "results" / ("scale.json" if args.scale else "quality.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    if args.scale:
        h = res["hard_epoch"]
        print(f"batch {res['batch_size']}, hard negatives for {res['hard_rows']} rows per batch, "
              f"index {res['index_type']} refreshed every {res['refresh_every']} steps, {res['threads']} threads\n")
        print("| log | train positives | hard epoch s | index+search share | events/s | uniform epoch s | peak RSS GiB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| 5M events, 100k users, 50k items | {res['data']['train']} | {h['train_seconds']:.1f} | "
              f"{h['index_share']:.1%} | {h['events_per_s']:.0f} | {res['uniform_epoch_s']:.1f} | {res['peak_rss_gib']} |")
    else:
        print(quality_table(res))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
