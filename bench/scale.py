"""How cost grows with the log and the catalogue: training time, memory and index cost at scale.

Two parts, both on synthetic data (nothing to download):

* ``train``: for each synthetic log (events x items; users = events / 50) and each process count, one
  epoch of ``recsys train --strategy hard`` in a child process: epoch seconds, events/s, peak RSS, and
  the share of the epoch spent building and searching the hard-negative index (``index_share`` in the
  checkpoint's per-epoch diagnostics). Logs are made once with ``recsys synth`` and kept in --data-dir.
  A process count the installed ``recsys train`` cannot run (no ``--nproc`` flag yet) gives an error
  row, not a crash.
* ``index``: for 50k and 1M clustered unit vectors (dim 64, inner product), build time and top-100 query
  latency of exact search (IndexFlatIP) and of the approximate indexes (IVF-Flat, HNSW): single queries
  on one thread (as the service searches) and batches of 1024 on --threads threads (as hard-negative
  mining does), median and p99, with recall@10/@100 of each approximate index against exact search and
  a sweep over nprobe / efSearch.

Results go to stdout as Markdown tables and to bench/results/scale.json (a part that is run replaces
that part in the file and keeps the other); ``--print FILE`` re-prints the tables of a result file.
Progress goes to stderr. Run times measured on the 2-core reference machine while other jobs shared it:
``--part index`` 20-25 min (the 1M-item builds: IVF 2-4 min, HNSW 7-10 min); ``--part train --events 1M
5M --items 50k --nproc 1 2`` 20-30 min. 20M events and 500k items were not run to the end here; expect
hours (the test evaluation over every user and, at 500k items, the HNSW serving index dominate), so
the default full run (all sizes, 1 and 2 processes) is an overnight job. ``--quick``: about 4 min.

    .venv/bin/python bench/scale.py --quick
    nice .venv/bin/python bench/scale.py --part index
    nice .venv/bin/python bench/scale.py --part train --events 1M 5M --items 50k --nproc 1
    nice .venv/bin/python bench/scale.py --nproc 1 2          # everything
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from machine import describe  # noqa: E402

from trainer.indexes import IndexSettings, build_index, choose_index, hnsw_settings, ivf_settings  # noqa: E402

DIM = 64
K = 100
BATCH = 1024
SWEEP = {"ivf": ("nprobe", (4, 8, 16, 32, 64, 128)), "hnsw": ("efSearch", (100, 128, 256, 512))}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'50k' -> 50000, '1M' -> 1000000, '2500' -> 2500."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def fmt_size(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- index


def clustered(n: int, centers: np.ndarray, rng: np.random.Generator, scale: np.ndarray | None = None,
              spread: float = 1.0) -> np.ndarray:
    """Unit vectors around random cluster centres with noise as large as the centres, the coordinates
    scaled by ``scale`` (per dimension) before normalising. Learned embeddings have taste clusters and
    use few directions; isotropic noise would be unfairly hard for an approximate index."""
    d = centers.shape[1]
    scale = np.ones(d) if scale is None else scale
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 200_000):
        m = min(n, s + 200_000) - s
        x = (centers[rng.integers(0, len(centers), m)] + spread * rng.standard_normal((m, d))) * scale
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def dimension_scale(effective_dim: float, d: int = DIM) -> np.ndarray | None:
    """Per-dimension scales exp(-i / D): the variance spectrum then has a participation ratio
    (sum λ)² / sum λ² of about D. None (isotropic) when D is 0."""
    return None if not effective_dim else np.exp(-np.arange(d) / effective_dim)


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def single_latency(index: Any, queries: np.ndarray, n: int) -> list[float]:
    """Milliseconds per one-vector search on one thread (the service pins FAISS to one thread)."""
    import faiss

    faiss.omp_set_num_threads(1)
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        index.search(q[None, :], K)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def batch_latency(index: Any, queries: np.ndarray, threads: int, reps: int, budget_s: float) -> tuple[list[float], np.ndarray]:
    """Milliseconds per search of BATCH queries on ``threads`` threads; also the results of the last batches
    over all queries (for recall)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    found = np.concatenate([index.search(queries[s:s + BATCH], K)[1] for s in range(0, len(queries), BATCH)])
    times: list[float] = []
    start = time.perf_counter()
    for r in range(reps):
        s = (r * BATCH) % max(1, len(queries) - BATCH + 1)
        t = time.perf_counter()
        index.search(queries[s:s + BATCH], K)
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return times, found


def set_param(index: Any, name: str, value: int) -> None:
    import faiss

    ix = faiss.downcast_index(index)
    if name == "nprobe":
        ix.nprobe = value
    else:
        ix.hnsw.efSearch = value


def index_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    import faiss

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for n in args.catalogue:
        centers = rng.standard_normal((max(1, n // args.cluster_size), DIM)).astype(np.float32)
        log(f"index: {fmt_size(n)} items, dim {DIM}: generating vectors")
        scale = dimension_scale(args.effective_dim)
        items = clustered(n, centers, np.random.default_rng(1), scale)
        queries = clustered(args.queries, centers, np.random.default_rng(2), scale)
        faiss.omp_set_num_threads(args.threads)
        t = time.perf_counter()
        exact = build_index(items, "flat")
        _, truth = exact.search(queries, K)
        log(f"index: exact top-{K} of {len(queries)} queries in {time.perf_counter() - t:.1f}s")
        for kind in ["flat", *args.kinds]:
            settings = IndexSettings("flat") if kind == "flat" else (
                ivf_settings(n) if kind == "ivf" else hnsw_settings(n))
            faiss.omp_set_num_threads(args.threads)
            t = time.perf_counter()
            index = exact if kind == "flat" else build_index(items, settings)
            build_s = 0.0 if kind == "flat" else time.perf_counter() - t
            if kind == "flat":  # time a fresh build for a fair column (the ground truth reused the first)
                t = time.perf_counter()
                build_index(items, "flat")
                build_s = time.perf_counter() - t
            log(f"index: {fmt_size(n)} {kind} built in {build_s:.1f}s {settings.to_dict()}")
            variants = [(None, None)]
            if kind in SWEEP and not args.no_sweep:
                name, values = SWEEP[kind]
                variants += [(name, v) for v in values if v != settings.to_dict()[name]]
            for name, value in variants:
                if name is not None:
                    set_param(index, name, value)
                single = single_latency(index, queries, args.single)
                batch, found = batch_latency(index, queries, args.threads, args.batch_reps, args.budget)
                row = {
                    "items": n, "dim": DIM, "effective_dim": args.effective_dim or DIM,
                    "cluster_size": args.cluster_size, "kind": kind, "default": name is None,
                    "settings": settings.to_dict() | ({name: value} if name else {}),
                    "build_s": round(build_s, 2),
                    "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 1) if name is None else None,
                    "single_ms_median": round(statistics.median(single), 4),
                    "single_ms_p99": round(pct(single, 99), 4),
                    "single_queries": len(single),
                    "batch_ms_median": round(statistics.median(batch), 2),
                    "batch_ms_p99": round(pct(batch, 99), 2),
                    "batches": len(batch),
                    "recall@10": round(recall(found, truth, 10), 4),
                    "recall@100": round(recall(found, truth, K), 4),
                    "threads": args.threads,
                    "chosen_for_mining": choose_index(n).kind == kind and name is None,
                    "chosen_for_serving": choose_index(n, serving=True).kind == kind and name is None,
                }
                rows.append(row)
                log(f"index: {fmt_size(n)} {kind} {name or 'default'}={value or ''} single "
                    f"{row['single_ms_median']:.3f} ms, batch {row['batch_ms_median']:.0f} ms, "
                    f"recall@100 {row['recall@100']:.3f}")
            del index
        del exact, items
    return rows


def index_table(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [f"Top-{K} inner-product search, dim {DIM}, clustered unit vectors; single queries on 1 thread, "
             f"batches of {BATCH} on {threads} threads; recall against exact search. "
             "m / s: what `choose_index` picks for mining / serving at that size.", "",
             "| items | index | settings | build s | MB | single ms p50 | single ms p99 | batch ms p50 | "
             "batch ms p99 | recall@10 | recall@100 |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["settings"]
        desc = {"flat": "exact", "ivf": f"nlist {s['nlist']}, nprobe {s['nprobe']}",
                "hnsw": f"M {s['M']}, efC {s['efConstruction']}, efSearch {s['efSearch']}"}[r["kind"]]
        picks = [tag for tag, serving in (("m", False), ("s", True))
                 if r["default"] and choose_index(r["items"], serving=serving).kind == r["kind"]]
        name = r["kind"] + (f" ({'/'.join(picks)})" if picks else "")
        build = f"{r['build_s']:.1f}" if r["default"] else ""
        mb = f"{r['index_mb']:.0f}" if r.get("index_mb") is not None else ""
        lines.append(f"| {fmt_size(r['items'])} | {name} | {desc} | {build} | {mb} | {r['single_ms_median']:.3f} | "
                     f"{r['single_ms_p99']:.3f} | {r['batch_ms_median']:.0f} | {r['batch_ms_p99']:.0f} | "
                     f"{r['recall@10']:.3f} | {r['recall@100']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- train


def recsys_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "recsys"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]


def supports_nproc() -> bool:
    out = subprocess.run([*recsys_cmd(), "train", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    return "--nproc" in out.stdout


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (KiB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a command: wall seconds, exit status, CPU seconds and peak RSS of its largest process (rusage
    of the child and its descendants, via wait4), the peak summed RSS of its process tree (polled), and
    the tail of its output. CPU seconds say more than wall time on a shared machine."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], tree_rss_kib(proc.pid))

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        deadline = time.monotonic() + timeout
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                status = -9
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status) if status != -9 else -9
        done.set()
        watcher.join()
        out.seek(0)
        err.seek(0)
        return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t, 1),
                "max_rss_gib": round(usage.ru_maxrss / 2**20, 2) if usage else None,
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 1) if usage else None,
                "tree_rss_gib": round(peak[0] / 2**20, 2),
                "stdout": out.read()[-2000:], "stderr": err.read()[-3000:]}


def synth_file(args: argparse.Namespace, events: int, items: int) -> Path:
    users = max(100, events // 50)
    path = Path(args.data_dir) / f"synth-{fmt_size(events)}ev-{fmt_size(users)}u-{fmt_size(items)}i-s0.csv"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"train: generating {path.name} with recsys synth")
    res = run_child([*recsys_cmd(), "synth", "--users", str(users), "--items", str(items), "--events", str(events),
                     "--seed", "0", "--out", str(path)], os.environ.copy(), args.timeout)
    if res["returncode"] != 0:
        raise RuntimeError(f"recsys synth failed: {res['stderr'][-500:]}")
    log(f"train: {path.name} written in {res['wall_s']}s")
    return path


def train_one(args: argparse.Namespace, path: Path, events: int, items: int, nproc: int,
              has_nproc: bool) -> dict[str, Any]:
    threads = max(1, args.threads // nproc)  # the trainer splits --threads between the ranks of one machine
    row: dict[str, Any] = {"events": events, "users": max(100, events // 50), "items": items, "nproc": nproc,
                           "threads_per_process": threads, "batch_size": args.batch_size, "file": path.name}
    if nproc > 1 and not has_nproc:
        return row | {"error": "`recsys train` has no --nproc option yet (distributed training not merged)"}
    if args.work_dir is not None:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.work_dir) as tmp:
        cmd = [*recsys_cmd(), "train", "--events", str(path), "--out", str(Path(tmp) / "ckpt"),
               "--strategy", "hard", "--epochs", "1", "--hard-warmup", "0", "--ship", "tested", "--no-progress",
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--seed", "0",
               "--version", "scale"]
        if has_nproc:
            cmd += ["--nproc", str(nproc)]
        if args.nice:
            cmd = ["nice", "-n", str(args.nice), *cmd]
        env = {**os.environ, "RECSYS_DATA_DIR": str(Path(tmp) / "var"), "PYTHONUNBUFFERED": "1"}
        log(f"train: {path.name}, {nproc} process(es) x {threads} thread(s): {' '.join(cmd[-24:])}")
        res = run_child(cmd, env, args.timeout)
        row.update({k: res[k] for k in ("returncode", "wall_s", "cpu_s", "max_rss_gib", "tree_rss_gib")})
        manifest = Path(tmp) / "ckpt" / "scale" / "manifest.json"
        if res["returncode"] != 0 or not manifest.exists():
            tail = (res["stderr"].strip().splitlines() or ["no output"])[-1]
            return row | {"error": f"exit {res['returncode']}: {tail[:300]}", "stderr_tail": res["stderr"][-1500:]}
        m = json.loads(manifest.read_text())
    epoch = next(d for d in m["diagnostics"] if d.get("epoch") == 1)
    row.update({
        "train_positives": m["metrics"]["data"]["train"],
        "epoch_s": epoch["train_seconds"],
        "events_per_s": epoch["events_per_s"],
        "index_share": epoch.get("index_share"),
        "index_refresh_s": epoch.get("index_refresh_s"),
        "hard_search_s": epoch.get("hard_search_s"),
        "index_refreshes": epoch.get("index_refreshes"),
        "sampling_share": epoch.get("sampling_share"),
        "train_total_s": m["metrics"].get("train_seconds"),
        "val_ndcg@10": epoch.get("val_ndcg@10"),
        "held_out_ndcg@10": m["metrics"].get("held_out", {}).get("ndcg@10"),
        "serving_index": m.get("index_settings") or m.get("index_type"),
        "processes_in_diagnostics": epoch.get("processes"),
    })
    log(f"train: {path.name} nproc {nproc}: epoch {row['epoch_s']:.1f}s, {row['events_per_s']:.0f} ev/s, "
        f"index share {row['index_share']}, peak RSS {row['max_rss_gib']} GiB (tree {row['tree_rss_gib']}), "
        f"wall {row['wall_s']}s")
    return row


def train_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    has_nproc = supports_nproc()
    if not has_nproc:
        log("train: `recsys train --help` shows no --nproc: 1-process runs go without the flag")
    rows = []
    for items in args.items:
        for events in args.events:
            try:
                path = synth_file(args, events, items)
            except RuntimeError as exc:
                rows.append({"events": events, "items": items, "error": str(exc)})
                continue
            for nproc in args.nproc:
                rows.append(train_one(args, path, events, items, nproc, has_nproc))
                save(args, "train", rows)
    return rows


def train_table(rows: list[dict[str, Any]]) -> str:
    lines = ["One epoch of `recsys train --strategy hard` (hard negatives from the first step, 256 mined rows "
             "per batch, index refreshed every 200 steps); peak RSS = largest process (ru_maxrss), "
             "tree = all processes summed (polled).", "",
             "| events | users | items | procs x threads | train positives | epoch s | events/s | index share | "
             "refresh s | search s | peak RSS GiB | tree RSS GiB | wall s | CPU s |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = (f"| {fmt_size(r['events'])} | {fmt_size(r.get('users', 0))} | {fmt_size(r['items'])} | "
                f"{r.get('nproc', '?')} x {r.get('threads_per_process', '?')} |")
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | | | | |")
            continue
        share = "" if r["index_share"] is None else f"{r['index_share']:.1%}"
        lines.append(f"{head} {r['train_positives']:,} | {r['epoch_s']:.1f} | {r['events_per_s']:,.0f} | {share} | "
                     f"{r['index_refresh_s'] or 0:.1f} | {r['hard_search_s'] or 0:.1f} | {r['max_rss_gib']} | "
                     f"{r['tree_rss_gib']} | {r['wall_s']:.0f} | {r.get('cpu_s') or ''} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def save(args: argparse.Namespace, part: str, rows: list[dict[str, Any]]) -> None:
    """Replace ``part`` in the JSON file, keeping the other part from an earlier run."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError):
        data = {}
    data[part] = {"rows": rows, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "args": {k: v for k, v in vars(args).items() if k != "out"},
                  "machine": describe()}
    out.write_text(json.dumps(data, indent=2, default=str))


def tables_from(path: str) -> str:
    """Re-print the tables of a JSON result file (e.g. after editing the table layout)."""
    data = json.loads(Path(path).read_text())
    out = []
    if "index" in data:
        out.append(index_table(data["index"]["rows"], data["index"]["args"]["threads"]))
    if "train" in data:
        out.append(train_table(data["train"]["rows"]))
    return "\n\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "train", "index"), default="all", help="what to measure")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (events 100k 300k, items 5k; catalogues 20k 100k): a smoke run of a minute")
    p.add_argument("--events", nargs="+", type=parse_size, default=None, metavar="N",
                   help="train: log sizes (default 1M 5M 20M); users = events / 50")
    p.add_argument("--items", nargs="+", type=parse_size, default=None, metavar="N",
                   help="train: catalogue sizes of the logs (default 50k 500k)")
    p.add_argument("--nproc", nargs="+", type=int, default=[1, 2], metavar="N",
                   help="train: process counts passed to `recsys train --nproc` (default 1 2)")
    p.add_argument("--threads", type=int, default=2,
                   help="total threads: split over the processes in train, used for batch search in index")
    p.add_argument("--batch-size", type=int, default=4096, help="train: positives per batch (default 4096)")
    p.add_argument("--nice", type=int, default=10, help="train: niceness of the child (0: none)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="train: seconds before a child is killed")
    p.add_argument("--data-dir", default=str(ROOT / "bench" / "results" / "data"),
                   help="where synthetic logs are written once and reused")
    p.add_argument("--work-dir", default=None, help="train: parent of the temporary checkpoint directories")
    p.add_argument("--catalogue", nargs="+", type=parse_size, default=None, metavar="N",
                   help="index: catalogue sizes (default 50k 1M)")
    p.add_argument("--kinds", nargs="+", choices=("ivf", "hnsw"), default=["ivf", "hnsw"],
                   help="index: approximate kinds compared with exact search")
    p.add_argument("--queries", type=int, default=2048, help="index: queries for recall and batch timing")
    p.add_argument("--single", type=int, default=500, help="index: single queries timed")
    p.add_argument("--batch-reps", type=int, default=20, help="index: batch searches timed (at most)")
    p.add_argument("--budget", type=float, default=20.0, help="index: seconds of batch timing per row (>= 3 reps)")
    p.add_argument("--cluster-size", type=int, default=50,
                   help="index: items per cluster of the synthetic vectors (clusters = items / this)")
    p.add_argument("--effective-dim", type=float, default=0.0,
                   help="index: participation ratio of the vectors' variance spectrum (0: isotropic, all 64)")
    p.add_argument("--no-sweep", action="store_true", help="index: skip the nprobe/efSearch sweep")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"), help="JSON output")
    p.add_argument("--print", metavar="JSON", default=None, help="only print the tables of an earlier result file")
    args = p.parse_args()
    if args.print:
        print(tables_from(args.print))
        return
    if args.quick:
        args.events = args.events or [100_000, 300_000]
        args.items = args.items or [5_000]
        args.catalogue = args.catalogue or [20_000, 100_000]
        args.single, args.batch_reps, args.budget = min(args.single, 200), min(args.batch_reps, 5), 5.0
    args.events = args.events or [1_000_000, 5_000_000, 20_000_000]
    args.items = args.items or [50_000, 500_000]
    args.catalogue = args.catalogue or [50_000, 1_000_000]

    tables = []
    if args.part in ("all", "index"):
        rows = index_part(args)
        save(args, "index", rows)
        tables.append(index_table(rows, args.threads))
    if args.part in ("all", "train"):
        rows = train_part(args)
        save(args, "train", rows)
        tables.append(train_table(rows))
    print("\n\n".join(tables))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
