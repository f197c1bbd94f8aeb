"""Group commit of POST /v1/events against a real server and database: exact counts under concurrency,
bad requests failing alone, back-pressure and bounded waits.

Writes are held up deterministically by taking the database's write path from the test: the SQLite
write-lock file the service's writers queue on, or an EXCLUSIVE table lock on PostgreSQL. Requests
sent meanwhile gather in the committer's queue and go into the database as one group on release.
"""

from __future__ import annotations

import fcntl
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from api_support import Server, assert_error, deploy
from sqlalchemy import func, select, text

from app.db.engine import make_engine
from app.db.models import Event


def metric(server: Server, name: str, labels: str = "") -> float:
    """Sum of a metric's samples on a single-worker server (optionally only those whose labels match)."""
    total = 0.0
    for line in httpx.get(server.base + "/metrics", timeout=10).text.splitlines():
        if re.match(rf"^{name}(\{{[^}}]*\}})? ", line) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def event(event_id: str) -> dict:
    """Content derived from the id, so every repetition of an id carries the same event."""
    n = sum(map(ord, event_id))
    return {"event_id": event_id, "user_id": f"u{n % 300}", "item_id": f"i{n % 400}", "type": "view"}


def stored(url: str, prefix: str) -> dict[str, int]:
    """event_id → number of rows, for the events whose id starts with ``prefix``."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Event.event_id, func.count())
                .where(Event.event_id.like(f"{prefix}%"))
                .group_by(Event.event_id)
            ).all()
    finally:
        engine.dispose()
    return dict(rows)


@contextmanager
def writes_blocked(url: str) -> Iterator[None]:
    """Hold the service's event writes until the block ends (reads go on)."""
    engine = make_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            with open(f"{engine.url.database}.write.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        else:
            with engine.connect() as conn:
                conn.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
                try:
                    yield
                finally:
                    conn.rollback()
    finally:
        engine.dispose()


def wait_until(condition, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_overlapping_concurrent_batches_store_each_event_once(server: Server) -> None:
    """8 threads post batches drawn from one pool of ids (repeats across and within requests)."""
    prefix = f"ov-{uuid.uuid4().hex[:8]}-"
    pool = [f"{prefix}{i}" for i in range(300)]
    commits0 = metric(server, "recsys_events_per_commit_count")

    def client(seed: int) -> list[tuple[int, dict]]:
        rng = random.Random(seed)
        answers = []
        with server.client() as c:
            for _ in range(25):
                batch = [event(rng.choice(pool)) for _ in range(rng.randint(1, 12))]
                body = batch[0] if len(batch) == 1 and rng.random() < 0.5 else batch
                resp = c.post("/v1/events", json=body)
                assert resp.status_code == 200, resp.text
                answers.append((len(batch), resp.json()))
        return answers

    with ThreadPoolExecutor(8) as pool_:
        answers = [a for part in pool_.map(client, range(8)) for a in part]
    commits = metric(server, "recsys_events_per_commit_count") - commits0
    for sent, body in answers:
        assert body["received"] == sent and body["accepted"] + body["duplicates"] == sent, body
    counts = stored(server.dep.url, prefix)
    assert set(counts.values()) == {1}, "an event_id stored twice"
    assert sum(body["accepted"] for _, body in answers) == len(counts), "accepted counts do not add up"
    assert 0 < commits < len(answers), f"{commits} commits for {len(answers)} requests: nothing was grouped"


def test_bad_requests_fail_alone_while_their_group_is_stored(server: Server) -> None:
    """In one group: valid requests, a batch the database refuses (a trigger), and invalid bodies.

    Invalid bodies get their 422 before any commit (while writes are still held); the refused batch gets
    422 ``rejected_by_database`` and stores nothing; every valid request of the group is stored.
    """
    prefix = f"grp-{uuid.uuid4().hex[:8]}-"
    engine = make_engine(server.dep.url)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        if postgres:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.event_id LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned event %', NEW.event_id "
                    "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text("CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.event_id LIKE '%poison%' "
                    "BEGIN SELECT RAISE(ABORT, 'poisoned event'); END"
                )
            )
    valid = [[event(f"{prefix}ok{r}-{j}") for j in range(5)] for r in range(6)]
    poisoned = [event(f"{prefix}fine-0"), event(f"{prefix}poison-1"), event(f"{prefix}fine-2")]
    invalid = [[event(f"{prefix}bad-0"), {**event(f"{prefix}bad-1"), "type": "Not A Type"}], {"event_id": ""}]
    answers: dict[str, httpx.Response] = {}

    def post(name: str, body: object) -> None:
        with httpx.Client(base_url=server.base, timeout=30.0) as c:
            answers[name] = c.post("/v1/events", json=body)

    try:
        with writes_blocked(server.dep.url):
            # PostgreSQL: the first group (this one request) waits on the table lock; the rest queue behind it.
            lead = threading.Thread(target=post, args=("lead", [event(f"{prefix}lead")]))
            lead.start()
            time.sleep(0.5)
            depth0 = metric(server, "recsys_events_queue_depth")
            jobs = [(f"valid{r}", b) for r, b in enumerate(valid)] + [("poisoned", poisoned)]
            jobs += [(f"invalid{r}", b) for r, b in enumerate(invalid)]
            threads = [threading.Thread(target=post, args=job) for job in jobs]
            for t in threads:
                t.start()
            queued = sum(len(b) for b in valid) + len(poisoned)
            wait_until(lambda: metric(server, "recsys_events_queue_depth") >= depth0 + queued)
            wait_until(lambda: all(f"invalid{r}" in answers for r in range(len(invalid))))
            assert not any(name.startswith(("valid", "poisoned", "lead")) for name in answers)
        for t in [lead, *threads]:
            t.join(30)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_poison" + (" ON events" if postgres else "")))
            if postgres:
                conn.execute(text("DROP FUNCTION refuse_poison()"))
        engine.dispose()
    for r in range(len(invalid)):
        assert_error(answers[f"invalid{r}"], 422, "validation_error")
    body = assert_error(answers["poisoned"], 422, "rejected_by_database")
    assert "poisoned event" in body["error"]["message"]
    for r in range(len(valid)):
        assert answers[f"valid{r}"].json() == {"received": 5, "accepted": 5, "duplicates": 0}
    assert answers["lead"].json()["accepted"] == 1
    expected = {e["event_id"] for b in valid for e in b} | {f"{prefix}lead"}
    assert set(stored(server.dep.url, prefix)) == expected, "a valid request was lost, or a refused one stored"


def test_full_queue_and_stalled_commits_answer_503(tmp_path: Path) -> None:
    """A queue of 20 events and a 1.5 s wait: with commits held, the third and fourth requests of 10 are
    refused at once (events_queue_full), the first two after 1.5 s (commit_timeout); none is stored, and
    all go in once the database moves again."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    srv = Server(dep, extra_env={"RECSYS_EVENTS_QUEUE_MAX": "20", "RECSYS_EVENTS_MAX_WAIT_SECONDS": "1.5"})
    try:
        srv.wait_ready()
        batches = [[event(f"bp-{r}-{j}") for j in range(10)] for r in range(4)]
        answers: list[tuple[float, httpx.Response]] = []

        def post(batch: list[dict]) -> None:
            start = time.monotonic()
            with srv.client() as c:
                resp = c.post("/v1/events", json=batch)
            answers.append((time.monotonic() - start, resp))

        with writes_blocked(dep.url):
            threads = [threading.Thread(target=post, args=(batch,)) for batch in batches]
            for n, t in enumerate(threads):  # one after the other, so which ones queue is known
                t.start()
                if n < 2:
                    wait_until(lambda n=n: metric(srv, "recsys_events_queue_depth") == 10 * (n + 1))
                else:
                    wait_until(lambda n=n: len(answers) == n - 1)
            for t in threads:
                t.join(10)
        codes = sorted(resp.json()["error"]["code"] for _, resp in answers)
        assert codes == ["commit_timeout"] * 2 + ["events_queue_full"] * 2, codes
        for elapsed, resp in answers:
            assert_error(resp, 503)
            assert resp.headers["retry-after"] == "1"
            assert elapsed < (1.5 if resp.json()["error"]["code"] == "events_queue_full" else 5.0)
        assert metric(srv, "recsys_events_refused_total", 'code="events_queue_full"') == 2
        assert metric(srv, "recsys_events_refused_total", 'code="commit_timeout"') == 2
        assert metric(srv, "recsys_events_queue_depth") == 0
        with srv.client() as c:
            for batch in batches:
                assert c.post("/v1/events", json=batch).json() == {"received": 10, "accepted": 10, "duplicates": 0}
    finally:
        srv.stop()


def test_known_users_and_items_are_written_in_one_autocommitted_statement(db_url: str) -> None:
    """The committer's short path (app/api/ingest.py): a group whose users and items the worker knows is
    one INSERT on an autocommit connection; it stores and names exactly the new events, on both backends."""
    from app.db.events import IdCache, cached_records, insert_new_events
    from app.db.migrate import upgrade

    def row(event_id: str, user: str, item: str) -> dict:
        return {"event_id": event_id, "user_id": user, "item_id": item, "type": "view", "value": None,
                "timestamp": 1.0}

    upgrade(db_url)
    engine = make_engine(db_url)
    ids = IdCache()
    try:
        first = [row("e1", "u1", "i1"), row("e2", "u2", "i2")]
        assert cached_records(first, ids) is None  # unknown users and items: looked up and created first
        with engine.connect() as conn, conn.begin():
            assert insert_new_events(conn, first, ids).keys() == {"e1", "e2"}
        again = [row("e2", "u2", "i2"), row("e3", "u1", "i2")]
        records = cached_records(again, ids)
        assert records is not None
        assert cached_records([*again, row("e4", "u1", "new item")], ids) is None
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            assert insert_new_events(conn, again, ids, records).keys() == {"e3"}  # e2 was stored already
        with engine.connect() as conn:  # committed: another connection reads it
            assert conn.scalar(select(func.count()).select_from(Event)) == 3
    finally:
        engine.dispose()


def test_new_users_and_items_are_created_once_by_concurrent_committers(postgres_url: str) -> None:
    """PostgreSQL's short path creates the users and items its id cache lacks (app/db/events.py:
    resolve_ids_async). Two workers' committers naming the same new ones at once each get every id, the
    same ids, and each user and item exists once; a known one is read, not created again."""
    import asyncio

    import psycopg

    from app.db.events import IdCache, resolve_ids_async
    from app.db.migrate import downgrade, upgrade

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    users = {f"new-u{k}" for k in range(300)} | {"known"}
    items = {f"new-i{k}" for k in range(50)}

    async def committer(ids: IdCache) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for part in range(0, 300, 30):  # groups of a few dozen, as the committers write them
                await resolve_ids_async(conn, ids, {f"new-u{k}" for k in range(part, part + 30)} | {"known"},
                                        items)

    async def both() -> tuple[IdCache, IdCache]:
        a, b = IdCache(), IdCache()
        await asyncio.gather(committer(a), committer(b))
        return a, b

    try:
        with engine.begin() as conn:
            known = conn.execute(text("INSERT INTO users (external_id) VALUES ('known') RETURNING id")).scalar()
        a, b = asyncio.run(both())
        assert a.users == b.users and a.items == b.items
        assert a.users.keys() == users and a.items.keys() == items and a.users["known"] == known
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM users")) == len(users)
            assert conn.scalar(text("SELECT count(DISTINCT id) FROM items")) == len(items)
    finally:
        engine.dispose()
        downgrade(postgres_url, "base")


@pytest.mark.parametrize("n", [0, 1, 99, 100, 101, 127, 128, 129, 4095, 4096, 4097, 10_000, 123_457])
def test_statements_come_in_a_few_sizes(n: int) -> None:
    """A group of any size is written in statements of a few sizes (each compiled once per connection):
    one statement up to VALUES_MAX rows (the autocommit path needs exactly one), else powers of two."""
    from app.db.events import CHUNK, VALUES_MAX, statement_sizes

    sizes = statement_sizes(n)
    assert sum(sizes) == n
    assert all(0 < s <= CHUNK for s in sizes)
    if n <= VALUES_MAX:
        assert sizes == ([n] if n else [])
    else:
        *powers, last = sizes
        assert all(s >= 128 and s & (s - 1) == 0 for s in powers)
        assert last < 128 or last & (last - 1) == 0
        assert len(sizes) <= n // CHUNK + 6


def test_a_group_is_written_in_user_order_and_each_users_events_keep_theirs(db_url: str) -> None:
    """The committer's rows go in by user (the user index's pages in order); a user's own events keep
    the order they came in, so their ids still say which of two same-time events came later."""
    from app.db.events import IdCache, insert_new_events
    from app.db.migrate import upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    ids = IdCache()
    try:
        arrived = [("a", "u2"), ("b", "u1"), ("c", "u2"), ("d", "u1"), ("e", "u3"), ("f", "u2")]
        rows = [{"event_id": e, "user_id": u, "item_id": "i1", "type": "view", "value": None, "timestamp": 1.0}
                for e, u in arrived]
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("INSERT INTO users (external_id) VALUES ('u3'), ('u1'), ('u2')")
            stored = insert_new_events(conn, rows, ids)
        assert sorted(stored, key=stored.get) == ["e", "b", "d", "a", "c", "f"]  # users u3, u1, u2 by id
    finally:
        engine.dispose()


def test_the_id_cache_warms_with_the_newest_users_and_items(db_url: str) -> None:
    """What the committer loads at start (app/api/ingest.py): the newest users and items with their
    database ids, so that their events take the one-statement path from the first request on."""
    from app.db.events import IdCache, cached_records, insert_event_rows
    from app.db.migrate import upgrade
    from app.db.models import User

    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            insert_event_rows(conn, [
                {"event_id": f"w{k}", "user_id": f"u{k}", "item_id": f"i{k}", "type": "view", "value": None,
                 "timestamp": float(k)} for k in range(5)
            ])
            internal = dict(conn.execute(select(User.external_id, User.id)).all())
        ids = IdCache()
        with engine.connect() as conn:
            assert ids.warm(conn, 3) == 6
        newest = sorted(internal, key=internal.get)[-3:]
        assert ids.users == {u: internal[u] for u in newest}
        assert len(ids.items) == 3
        known = [{"event_id": "n1", "user_id": newest[0], "item_id": next(iter(ids.items)), "type": "view",
                  "value": None, "timestamp": 1.0}]
        assert cached_records(known, ids) is not None
    finally:
        engine.dispose()
