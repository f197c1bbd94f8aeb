"""Serving throughput and latency of the real HTTP service on loopback, next to a trivial endpoint.

    .venv/bin/python bench/serve.py [--users 100000] [--items 50000] [--seconds 4] [--workers 1 2]
                                    [--repeat 3] [--postgres postgresql://postgres@127.0.0.1:5432/test]

Builds a 100k-user × 50k-item checkpoint (SVD of a clustered synthetic log; ``--embeddings random`` for
structureless ones) and a SQLite (or a new, dropped-afterwards PostgreSQL) database with those users, items and ~10 events per user; starts the service
through ``app.api.server.run`` (1 and 2 workers); a load generator in another process (wrk when
installed, else an async httpx client; bounded by time and request count) measures requests/s and p50/p95/p99 for recommendations,
similar items, event POSTs and /healthz at concurrency 1, 16 and 64, ``--repeat`` times per cell in
rounds over the endpoints (medians reported). ``events`` posts one new event per request (a unique
``event_id`` each), ``events_100`` and ``events_1000`` batches of 100 and 1000; their events/s column is
requests/s × batch. Measurement starts once every worker has its serving index and top lists. Prints a
Markdown table and writes bench/results/serve.json. Each round records how the load generator's
connections fell between the workers (they share one listening socket, and the split, from 8/8 to 16/0,
moves a round's rate as much as any code change): the table's last column, one split per round.

Event ingestion on both backends, 2 workers at 16 connections:

    .venv/bin/python bench/serve.py --workers 2 --concurrency 16 --endpoints healthz events events_100 \
        events_1000 [--postgres postgresql://postgres@127.0.0.1:5432/test]

The server runs with the service's defaults; ``--setting RECSYS_EVENTS_GROUP_MAX=20000`` (repeatable)
changes one for the run and is recorded in the JSON's setup. Before each measurement the bench waits (at
most ``--settle-timeout`` seconds) until the machine's CPU is below ``--settle-cpu`` busy, so that what a
cell leaves behind (a database's background work after batches) does not land in the next; each run's
wait is in the JSON (``settle_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

ENDPOINTS = ("healthz", "recommendations", "recommendations_recent", "similar", "events", "events_100",
             "events_1000")
RECENT_USERS = 2000  # users u0… that post events after the model's watermark before the cells run


def user_range(endpoint: str, n_users: int) -> tuple[int, int]:
    """Which users an endpoint's requests name: recommendations_recent the users with events since the
    watermark, recommendations users who never get any (the events cells post for a range of their own)."""
    half = max(n_users // 2, RECENT_USERS + 1)
    if endpoint == "recommendations_recent":
        return 0, RECENT_USERS
    if endpoint == "recommendations":
        return half, n_users
    return RECENT_USERS, half


def post_recent_events(base: str, n_items: int, per_user: int = 3) -> None:
    """Clicks after the watermark for users u0…u{RECENT_USERS-1} (idempotent ids: reruns add nothing)."""
    import httpx

    rng = random.Random(0)
    events = [{"event_id": f"recent-{u}-{k}", "user_id": f"u{u}", "item_id": f"i{rng.randrange(n_items)}",
               "type": "click"} for u in range(RECENT_USERS) for k in range(per_user)]
    with httpx.Client(base_url=base, timeout=30) as client:
        for start in range(0, len(events), 1000):
            client.post("/v1/events", json=events[start:start + 1000]).raise_for_status()
    time.sleep(1.0)  # every worker's recent-events view polls at 0.25 s
MEDIAN_KEYS = ("rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_req")


def batch_size(endpoint: str) -> int:
    """Events per request of an events endpoint (``events``: 1, ``events_100``: 100), 0 for the others."""
    if not endpoint.startswith("events"):
        return 0
    return int(endpoint.partition("_")[2] or 1)


# --- fixture -------------------------------------------------------------------------------------
def fresh_postgres(base: str) -> str:
    """A new, empty database next to ``base`` (the bench never touches existing data)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"recsys_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        base.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return (
        make_url(base.replace("postgresql://", "postgresql+psycopg://", 1))
        .set(database=name)
        .render_as_string(hide_password=False)
    )


def drop_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def factorise(matrix, dim: int, seed: int = 0):  # noqa: ANN001, ANN201
    """Rank-``dim`` embeddings of a user × item matrix (randomised SVD, split as U√S and V√S).

    A truncated SVD of the interaction matrix (PureSVD) stands in for a trained model: the embeddings
    carry the log's structure (taste clusters, popularity), as trained ones do, without torch. Random
    Gaussian embeddings would have none, and no approximate index can serve those well (``--embeddings
    random`` shows it: the service then keeps exact search).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    y = matrix @ rng.normal(size=(matrix.shape[1], dim + 16)).astype(np.float32)
    for _ in range(3):  # power iterations sharpen the leading subspace
        y, _ = np.linalg.qr(y)
        y = matrix @ (matrix.T @ y)
    q, _ = np.linalg.qr(y)
    u_b, s, vt = np.linalg.svd((matrix.T @ q).T, full_matrices=False)
    root = np.sqrt(s[:dim])
    users = (q @ u_b[:, :dim]) * root
    items = vt[:dim].T * root
    return users.astype(np.float32), np.ascontiguousarray(items, dtype=np.float32)


def build(
    data_dir: Path,
    n_users: int,
    n_items: int,
    dim: int,
    per_user: int,
    url: str | None = None,
    embeddings: str = "svd",
) -> str:
    """A promoted checkpoint plus a migrated database holding its users, items and events.

    Events come from ``recsys synth`` (taste clusters, Zipf popularity, some explicit negatives);
    embeddings are factorised from them (``svd``) or drawn at random (``random``).
    """
    import numpy as np
    from scipy import sparse

    from app.db import registry
    from app.db.engine import make_engine
    from app.db.events import analyze_after_import, insert_events, max_event_id
    from app.db.migrate import upgrade
    from trainer.checkpoint import write_checkpoint
    from trainer.synth import SynthSpec, generate

    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(n_users)]
    items = [f"i{j}" for j in range(n_items)]
    frame = generate(SynthSpec(users=n_users, items=n_items, events=n_users * per_user, seed=0))
    rows = frame["user_id"].str[1:].astype(np.int64).to_numpy()
    cols = frame["item_id"].str[1:].astype(np.int64).to_numpy()
    negative = frame["type"].isin(["dislike", "skip"]).to_numpy()
    url = url or f"sqlite:///{data_dir / 'recsys.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        insert_events(conn, frame)
        analyze_after_import(conn)  # as `recsys import` leaves a database
        watermark = max_event_id(conn)

    def pairs(mask):  # noqa: ANN001, ANN202
        m = sparse.csr_matrix(
            (np.ones(int(mask.sum()), dtype=np.float32), (rows[mask], cols[mask])), shape=(n_users, n_items)
        )
        m.data[:] = 1.0
        return m

    seen, feedback = pairs(~negative), pairs(negative)
    if embeddings == "svd":
        user_emb, item_emb = factorise(seen, dim)
    else:
        user_emb = rng.normal(0, 1 / np.sqrt(dim), (n_users, dim)).astype(np.float32)
        item_emb = rng.normal(0, 1 / np.sqrt(dim), (n_items, dim)).astype(np.float32)
    path = write_checkpoint(
        data_dir / "checkpoints",
        version="bench",
        user_embeddings=user_emb,
        item_embeddings=item_emb,
        user_ids=users,
        item_ids=items,
        item_popularity=np.bincount(cols[~negative], minlength=n_items),
        seen=seen,
        feedback=feedback,
        watermark=watermark,
    )
    with engine.begin() as conn:
        registry.register(conn, "bench", str(path), watermark=watermark, status="promoted")
    engine.dispose()
    return url


# --- load generator (runs in its own process) ----------------------------------------------------
async def _load(
    base: str, endpoint: str, concurrency: int, seconds: float, max_requests: int, n_users: int, n_items: int
) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    rng = random.Random(concurrency)
    run_id = uuid.uuid4().hex[:8]
    deadline = time.perf_counter() + seconds
    lo, hi = user_range(endpoint, n_users)

    def request(client: httpx.AsyncClient, n: int):  # noqa: ANN202
        if endpoint == "healthz":
            return client.get("/healthz")
        if endpoint.startswith("recommendations"):
            return client.get(f"/v1/users/u{rng.randrange(lo, hi)}/recommendations", params={"k": 10})
        if endpoint == "similar":
            return client.get(f"/v1/items/i{rng.randrange(n_items)}/similar", params={"k": 10})
        events = [
            {
                "event_id": f"{run_id}-{n}-{j}",
                "user_id": f"u{rng.randrange(lo, hi)}",
                "item_id": f"i{rng.randrange(n_items)}",
                "type": "click",
            }
            for j in range(batch_size(endpoint))
        ]
        return client.post("/v1/events", json=events[0] if endpoint == "events" else events)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                resp = await request(client, sent)
                ok = resp.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as client:
        for _ in range(min(50, concurrency * 5)):  # warm-up: connections and caches
            await client.get("/healthz")
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


def loadgen_main(argv: list[str]) -> None:
    base, endpoint, conc, seconds, max_req, n_users, n_items = argv
    try:  # a faster event loop for the client: the load generator should not be the bottleneck
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(
        _load(base, endpoint, int(conc), float(seconds), int(max_req), int(n_users), int(n_items))
    )
    print(json.dumps(out))


WRK_SCRIPT = r"""
local endpoint, lo, hi, n_items, run_id, batch
local counter = 0
local ready, n_ready = {}, 20000
-- GET requests are formatted once, in init: building a URL per request in Lua cost wrk more CPU for the
-- random-id endpoints than for /healthz, CPU the 2-core server then lacked (a bias against them)
function init(args)
  endpoint, lo, hi, n_items = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  batch = tonumber(string.match(endpoint, "^events_(%d+)$") or "1")
  math.randomseed(os.time())
  run_id = string.format("%d%06d", os.time(), math.random(0, 999999))
  for i = 1, n_ready do
    if endpoint == "healthz" then
      ready[i] = wrk.format("GET", "/healthz")
    elseif string.sub(endpoint, 1, 15) == "recommendations" then
      ready[i] = wrk.format("GET", "/v1/users/u" .. math.random(lo, hi - 1) .. "/recommendations?k=10")
    elseif endpoint == "similar" then
      ready[i] = wrk.format("GET", "/v1/items/i" .. math.random(0, n_items - 1) .. "/similar?k=10")
    end
  end
end
local function event(j)
  return string.format('{"event_id":"wrk-%s-%d-%d","user_id":"u%d","item_id":"i%d","type":"click"}',
    run_id, counter, j, math.random(lo, hi - 1), math.random(0, n_items - 1))
end
function request()
  counter = counter + 1
  if string.sub(endpoint, 1, 6) ~= "events" then
    return ready[counter % n_ready + 1]
  end
  local body
  if endpoint == "events" then
    body = event(0)
  else
    local parts = {}
    for j = 1, batch do
      parts[j] = event(j)
    end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "errors": %d, "rps": %.1f, "p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def wrk_load(base: str, endpoint: str, concurrency: int, seconds: float, n_users: int, n_items: int) -> dict:
    """wrk (C, one thread): a load generator light enough not to starve a 2-core server."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT)
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",  # wrk's default of 2 s counted slow batches of 1000 events as errors, not as latency
                "-s",
                str(script),
                base,
                "--",
                endpoint,
                *map(str, user_range(endpoint, n_users)),
                str(n_items),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        script.unlink()
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


# --- orchestration -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    data_dir: Path, url: str, workers: int, log_level: str, settings: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, float, dict]:
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(RECSYS_DATABASE_URL=url, RECSYS_DATA_DIR=str(data_dir), RECSYS_LOG_LEVEL=log_level)
    env.update(settings or {})
    code = (
        f"from app.api.server import run; run(host='127.0.0.1', port={port}, workers={workers}, "
        f"checkpoint=None, log_level={log_level!r})"
    )
    log = (data_dir / f"server-{workers}.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log.name}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    ready = time.perf_counter() - t0
    if workers > 1:  # every worker loads its own copy; give the others time to finish loading
        deadline = time.time() + 30
        while time.time() < deadline:
            text = httpx.get(base + "/metrics", timeout=5).text
            loaded = [
                ln for ln in text.splitlines() if ln.startswith('recsys_model_loads_total{outcome="loaded"}')
            ]
            if loaded and float(loaded[0].split()[-1]) >= workers:
                break
            time.sleep(0.1)
    index = wait_for_index(base, workers)
    index["ready_s"] = round(time.perf_counter() - t0, 2)
    return proc, base, ready, index


def _gauge(text: str, name: str) -> list[float]:
    """Every sample of a gauge (one per worker in multiprocess mode)."""
    return [
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith(name + "{") or ln.startswith(name + " ")
    ]


def wait_for_index(base: str, workers: int, timeout: float = 180.0) -> dict:
    """Measure the steady state: wait until every worker has its serving index and top lists (built or cached)
    and its in-memory view of recent events (the fixture's events accumulate over runs)."""
    import httpx

    start = time.time()
    while True:
        text = httpx.get(base + "/metrics", timeout=5).text
        building = _gauge(text, "recsys_serving_index_building")
        recent = _gauge(text, "recsys_recent_events_view_ready")  # else recommendations query the DB
        settled = len(building) >= workers and not any(building) and len(recent) >= workers and all(recent)
        if settled or time.time() > start + timeout:
            break
        if not building and time.time() > start + 5:  # a server without the gauge (older code)
            break
        time.sleep(0.2)
    approximate = _gauge(text, "recsys_serving_index_approximate")
    recall = _gauge(text, "recsys_serving_index_recall")
    top = _gauge(text, "recsys_serving_top_lists")
    return {
        "top_lists": bool(top) and all(top),
        "approximate": bool(approximate) and all(approximate),
        "recall_at_10": min(recall) if recall else None,
        "still_building": any(building),
        "recent_view_ready": bool(recent) and all(recent),
    }


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def settle(limit: float, timeout: float, window: float = 0.5) -> float:
    """Wait until the machine's CPU is below ``limit`` busy (a share of all cores) over ``window`` seconds,
    at most ``timeout`` seconds; the seconds waited. What a cell leaves behind (PostgreSQL's autovacuum
    and checkpoints after a batch cell, SQLite's WAL checkpoints, writeback) then does not land in the
    next cell: after the batches of 1000, PostgreSQL's `/healthz` rounds fell from ~9,500 to 3,100-4,300
    req/s without this wait."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        busy0, total0 = _cpu_jiffies()
        time.sleep(window)
        busy1, total1 = _cpu_jiffies()
        if (busy1 - busy0) / max(total1 - total0, 1) < limit:
            break
    return round(time.monotonic() - start, 2)


def _group_stats(pgid: int) -> list[tuple[str, list[str]]]:
    """(pid, /proc/<pid>/stat fields after the command name) of every process in the server's process
    group (uvicorn supervisor and workers)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp)
            found.append((pid, fields))
    return found


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU of every process in the server's process group."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[11]) + int(fields[12]) for _, fields in _group_stats(pgid)) / tick


def connections_per_process(pgid: int, port: int) -> list[int]:
    """Established connections to ``port`` held by each process of the server's group, most first.

    The workers share one listening socket, and which of them accepts a connection is a race: `wrk`'s 16
    connections have split 16/0 as often as 8/8, and a single event's rate with them (docs/benchmarks.md),
    so each run records its split. Linux only (/proc); [] elsewhere."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        lines += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    except OSError:
        return []
    wanted = f":{port:04X}"
    inodes = {f[9] for f in (line.split() for line in lines) if f[1].endswith(wanted) and f[3] == "01"}
    counts = []
    for pid, _ in _group_stats(pgid):
        try:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if held & inodes:
            counts.append(len(held & inodes))
    return sorted(counts, reverse=True)


def split_after(delay: float, pgid: int, port: int) -> Callable[[], list[int]]:
    """Read ``connections_per_process`` ``delay`` seconds from now, on a timer thread; the returned
    function waits for that reading and gives it."""
    found: list[int] = []
    timer = threading.Timer(delay, lambda: found.extend(connections_per_process(pgid, port)))
    timer.start()

    def reading() -> list[int]:
        timer.join()
        return found

    return reading


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if "healthz" not in args.endpoints:
        parser.error("--endpoints must include healthz: every row is reported as a ratio to it, in the same run")
    if args.loadgen == "httpx":  # Python's client takes most of a core: the server's figures fall ~15x
        print("load generator: httpx (wrk is not installed: `apt-get install -y wrk`); its figures are not "
              "comparable with wrk's", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    data_dir, url = _fixture(args)
    print(
        f"fixture: {args.users} users × {args.items} items, dim {args.dim}, ready in "
        f"{time.perf_counter() - t0:.1f}s under {data_dir}",
        file=sys.stderr,
    )
    try:
        results = measure(args, data_dir, url)
    finally:
        if args.postgres:
            drop_postgres(url)
    report(args, results)


FIXTURE_KEYS = ("users", "items", "dim", "events_per_user", "embeddings")


def _fixture(args: argparse.Namespace) -> tuple[Path, str]:
    """(data directory, database URL) of the fixture: ``--fixture``'s when it holds one (the size recorded
    in its fixture.json replaces the size flags, as the load generator draws users and items from that
    range), else a new one built from the flags (kept under ``--fixture`` when given)."""
    if args.fixture and not args.postgres and (args.fixture / "recsys.db").exists():
        record = args.fixture / "fixture.json"
        built = json.loads(record.read_text()) if record.exists() else {}
        changed = [f"--{k.replace('_', '-')} {v}" for k, v in built.items() if getattr(args, k) != v]
        if changed:
            print(f"reusing the fixture in {args.fixture}, built with {', '.join(changed)}", file=sys.stderr)
        vars(args).update(built)
        return args.fixture, f"sqlite:///{args.fixture / 'recsys.db'}"
    keep = args.fixture and not args.postgres  # PostgreSQL: a fresh database, so a fresh directory for it too
    data_dir = args.fixture if keep else Path(tempfile.mkdtemp(prefix="recsys-serve-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    url = build(data_dir, args.users, args.items, args.dim, args.events_per_user,
                fresh_postgres(args.postgres) if args.postgres else None, args.embeddings)
    if keep:
        (data_dir / "fixture.json").write_text(json.dumps({k: getattr(args, k) for k in FIXTURE_KEYS}))
    return data_dir, url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--events-per-user", type=int, default=10)
    parser.add_argument(
        "--embeddings",
        choices=["svd", "random"],
        default="svd",
        help="svd: factorised from the synthetic log (structured, like trained ones); random: Gaussian.",
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="Duration of each measurement.")
    parser.add_argument("--max-requests", type=int, default=50_000, help="Cap per measurement.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--log-level", default="warning", help="Service log level (info logs every request).")
    parser.add_argument(
        "--postgres", help="Base PostgreSQL URL: run against a new database there instead of SQLite."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="Measurements per cell, in rounds over the endpoints; the table shows medians. With several "
        "workers, which worker each of wrk's connections lands on varies from run to run.",
    )
    parser.add_argument(
        "--endpoints",
        nargs="+",
        choices=ENDPOINTS,
        default=list(ENDPOINTS),
        help="Endpoints to measure, in this order (keep healthz first: ratios are against it).",
    )
    parser.add_argument(
        "--fixture",
        type=Path,
        help="Keep the SQLite fixture in this directory and reuse it on later runs (built when missing; a reused "
        "fixture keeps the --users, --items, --dim it was built with). With --postgres each run builds a fresh "
        "database and directory.",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        type=_setting,
        metavar="RECSYS_NAME=VALUE",
        help="A service setting for the server under test (repeatable), e.g. RECSYS_EVENTS_GROUP_MAX=20000; "
        "the server otherwise runs with the defaults, whatever RECSYS_* this shell has.",
    )
    parser.add_argument(
        "--settle-cpu",
        type=float,
        default=0.15,
        help="Before each measurement, wait until the machine's CPU is below this share busy (all cores), "
        "so that one cell's aftermath (database background work) does not land in the next.",
    )
    parser.add_argument(
        "--settle-timeout", type=float, default=15.0, help="Longest wait for --settle-cpu, in seconds (0: no wait)."
    )
    parser.add_argument(
        "--loadgen",
        choices=["wrk", "httpx"],
        default="wrk" if shutil.which("wrk") else "httpx",
        help="Load generator: wrk (Debian package `wrk`, default when installed) or the async httpx client.",
    )
    return parser


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("RECSYS_"):
        raise argparse.ArgumentTypeError(f"expected RECSYS_NAME=VALUE, got {text!r}")
    return name, value


def measure(args: argparse.Namespace, data_dir: Path, url: str) -> list[dict]:
    """One row per (workers, concurrency, endpoint): the medians of ``--repeat`` runs, taken in rounds
    over the endpoints so that every endpoint sees the same machine state."""
    results: list[dict] = []
    for workers in args.workers:
        proc, base, ready, index = start_server(data_dir, url, workers, args.log_level, dict(args.setting))
        if "recommendations_recent" in args.endpoints:
            post_recent_events(base, args.items)
        print(
            f"workers={workers}: ready in {ready:.2f}s (process start + model load); serving index "
            f"{index} after {index['ready_s']:.2f}s",
            file=sys.stderr,
        )
        try:
            for conc in args.concurrency:
                runs: dict[str, list[dict]] = {endpoint: [] for endpoint in args.endpoints}
                for _ in range(args.repeat):
                    for endpoint in args.endpoints:
                        load = _run_once(args, proc, base, endpoint, conc, workers)
                        runs[endpoint].append(load)
                        print(json.dumps({"workers": workers, "concurrency": conc, "endpoint": endpoint, **load}),
                              file=sys.stderr)
                meta = {"workers": workers, "concurrency": conc, "ready_s": round(ready, 2), "index": index,
                        "loadgen": args.loadgen}
                results += [_median_row(meta, endpoint, done) for endpoint, done in runs.items()]
        finally:
            stop_server(proc)
    return results


def _run_once(args: argparse.Namespace, proc: subprocess.Popen, base: str, endpoint: str, conc: int,
              workers: int) -> dict:
    """One measurement of ``endpoint`` once the machine has settled, with the server's CPU per request
    and how the load generator's connections fell between the workers."""
    waited = settle(args.settle_cpu, args.settle_timeout)
    cpu0 = group_cpu_seconds(proc.pid)
    probe = split_after(min(1.0, args.seconds / 2), proc.pid, int(base.rsplit(":", 1)[1]))
    if args.loadgen == "wrk":
        load = wrk_load(base, endpoint, conc, args.seconds, args.users, args.items)
    else:
        load = httpx_load(args, base, endpoint, conc)
    cpu = group_cpu_seconds(proc.pid) - cpu0
    load["server_cpu_ms_per_req"] = round(1000 * cpu / max(load["requests"], 1), 3)
    load["settle_s"] = waited
    held = probe()
    load["connections_per_worker"] = held + [0] * (workers - len(held)) if held else []
    return load


def _median_row(meta: dict, endpoint: str, done: list[dict]) -> dict:
    """A table row: the median of each measured figure over the runs ``done``, errors summed."""
    return {
        **meta,
        "endpoint": endpoint,
        "batch": batch_size(endpoint),
        "repeats": len(done),
        **{key: float(statistics.median(d[key] for d in done)) for key in MEDIAN_KEYS},
        "requests": sum(d["requests"] for d in done),
        "errors": sum(d["errors"] for d in done),
        "splits": [_split(d) for d in done],
        "runs": done,
    }


def _split(run: dict) -> str:
    """A run's connections per worker as "9/7" ("?" when they could not be read)."""
    return "/".join(map(str, run["connections_per_worker"])) or "?"


def httpx_load(args: argparse.Namespace, base: str, endpoint: str, conc: int) -> dict:
    """The async httpx generator in its own process (when wrk is not installed)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--loadgen",
            base,
            endpoint,
            str(conc),
            str(args.seconds),
            str(args.max_requests),
            str(args.users),
            str(args.items),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def report(args: argparse.Namespace, results: list[dict]) -> None:
    lines = [
        "| workers | concurrency | endpoint | req/s | vs healthz | events/s | p50 ms | p95 ms | p99 ms "
        "| errors | server CPU ms/req | connections per worker |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        trivial = next(
            x
            for x in results
            if x["workers"] == r["workers"]
            and x["concurrency"] == r["concurrency"]
            and x["endpoint"] == "healthz"
        )
        r["ratio_to_healthz"] = round(r["rps"] / trivial["rps"], 3)
        r["events_per_s"] = round(r["rps"] * r["batch"], 1) if r["batch"] else None
        events = f"{r['events_per_s']:.0f}" if r["batch"] else ""
        lines.append(
            f"| {r['workers']} | {r['concurrency']} | {r['endpoint']} | {r['rps']:.0f} | "
            f"{r['ratio_to_healthz']:.2f} | {events} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} | {r['server_cpu_ms_per_req']:.2f} | {' '.join(r['splits'])} |"
        )
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "users": args.users,
        "items": args.items,
        "dim": args.dim,
        "seconds": args.seconds,
        "machine": describe(),
        "log_level": args.log_level,
        "database": "postgresql" if args.postgres else "sqlite",
        "embeddings": args.embeddings,
        "loadgen": args.loadgen,
        "settings": dict(args.setting),
        "settle": {"cpu": args.settle_cpu, "timeout_s": args.settle_timeout},
    }
    args.out.write_text(json.dumps({"setup": meta, "results": results}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2:])
    else:
        main()
