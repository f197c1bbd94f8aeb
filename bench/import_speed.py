"""How fast `recsys import` loads the MovieLens sets into SQLite and PostgreSQL (first load and re-import).

    python bench/import_speed.py [--datasets ../shared/datasets] [--postgres postgresql://postgres@127.0.0.1:5432/test]

Prints a Markdown table and writes bench/results/import_speed.json. Each run uses a new database.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.db.engine import make_engine
from app.db.events import count_events, insert_events
from app.db.migrate import upgrade
from app.eventfiles import read_event_file

ROOT = Path(__file__).resolve().parent.parent
FILES = {"ml-100k": "ml-100k/u.data", "ml-latest-small": "ml-latest-small/ratings.csv"}


def load(url: str, path: Path) -> dict[str, float]:
    """Parse + validate + insert in one transaction (what `recsys import` does), then re-import."""
    upgrade(url)
    engine = make_engine(url)
    t0 = time.perf_counter()
    frame = read_event_file(path)
    t1 = time.perf_counter()
    with engine.begin() as conn:
        inserted = insert_events(conn, frame)
    t2 = time.perf_counter()
    with engine.begin() as conn:
        again = insert_events(conn, frame)
        total = count_events(conn)
    t3 = time.perf_counter()
    engine.dispose()
    assert inserted == total == len(frame) and again == 0
    return {"events": total, "parse_s": t1 - t0, "insert_s": t2 - t1, "total_s": t2 - t0, "reimport_s": t3 - t2}


def sqlite_url() -> str:
    return f"sqlite:///{tempfile.mkdtemp(prefix='recsys-bench-')}/recsys.db"


def postgres_url(base: str) -> tuple[str, str]:
    base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"recsys_bench_{uuid.uuid4().hex[:8]}"
    with create_engine(base, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return make_url(base).set(database=name).render_as_string(hide_password=False), name


def drop_postgres(base: str, name: str) -> None:
    base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    with create_engine(base, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "import_speed.json")
    args = parser.parse_args()

    rows = []
    for dataset, rel in FILES.items():
        path = args.datasets / rel
        for backend in ("sqlite", "postgresql"):
            runs = []
            for _ in range(args.repeats):
                if backend == "sqlite":
                    runs.append(load(sqlite_url(), path))
                else:
                    url, name = postgres_url(args.postgres)
                    try:
                        runs.append(load(url, path))
                    finally:
                        drop_postgres(args.postgres, name)
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"dataset": dataset, "backend": backend, "repeats": len(runs), **med})

    print("| dataset | backend | events | parse s | insert s | import s (median) | events/s | re-import s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['backend']} | {int(r['events']):,} | {r['parse_s']:.2f} | {r['insert_s']:.2f} "
            f"| {r['total_s']:.2f} | {r['events'] / r['total_s']:,.0f} | {r['reimport_s']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
