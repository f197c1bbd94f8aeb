"""Bulk event I/O: upsert users and items, insert events idempotently, read them back for training.

One code path for the importer, the HTTP API and the trainer, on SQLite and PostgreSQL alike.
Inserts use ``ON CONFLICT DO NOTHING`` on the unique keys, so a retried write never duplicates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, Table, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from app.db.models import Event, Item, User

if TYPE_CHECKING:
    import psycopg

CHUNK = 4096  # rows per statement at most (SQLite: 6 × 4096 parameters of its 32,766)
VALUES_MAX = 100  # up to this many events, one INSERT … VALUES; PostgreSQL COPYs larger batches


def _insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], key: str) -> int:
    """INSERT … ON CONFLICT (key) DO NOTHING; returns how many rows were new."""
    if not rows:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING counts the new rows on both backends (executemany's rowcount is -1 on psycopg).
    stmt = dialect.insert(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c.id)
    inserted = 0
    for start in range(0, len(rows), CHUNK):
        inserted += len(conn.execute(stmt, list(rows[start : start + CHUNK])).all())
    return inserted


def _ensure_ids(
    conn: Connection, model: type[User] | type[Item], external_ids: Iterable[str]
) -> dict[str, int]:
    wanted = sorted(set(external_ids))
    table = model.__table__
    _insert_ignore(conn, table, [{"external_id": e} for e in wanted], "external_id")
    mapping: dict[str, int] = {}
    col = table.c.external_id
    for start in range(0, len(wanted), CHUNK):
        part = wanted[start : start + CHUNK]
        mapping.update(conn.execute(select(col, table.c.id).where(col.in_(part))).all())
    return mapping


def upsert_users(conn: Connection, external_ids: Iterable[str]) -> dict[str, int]:
    """Create the users that do not exist yet; return external id → internal id for all of them."""
    return _ensure_ids(conn, User, external_ids)


def upsert_items(conn: Connection, external_ids: Iterable[str]) -> dict[str, int]:
    """Create the items that do not exist yet; return external id → internal id for all of them."""
    return _ensure_ids(conn, Item, external_ids)


def insert_events(
    conn: Connection, frame: pd.DataFrame, progress: Callable[[int], None] | None = None
) -> int:
    """Insert events (columns `app.eventfiles.EVENT_COLUMNS`, external ids) in the caller's transaction.

    Unknown users and items are created. Returns the number of new events; rows whose
    ``event_id`` already exists are skipped, which makes imports and HTTP retries idempotent.
    """
    if frame.empty:
        return 0
    values = frame["value"].astype("float64")
    rows = pd.DataFrame(
        {
            "event_id": frame["event_id"].astype(str),
            "user_id": frame["user_id"].astype(str),
            "item_id": frame["item_id"].astype(str),
            "type": frame["type"].astype(str),
            "value": values.astype(object).where(values.notna(), None),
            "timestamp": frame["timestamp"].astype("float64"),
        }
    ).to_dict("records")
    return insert_event_rows(conn, rows, progress)


def analyze_after_import(conn: Connection) -> None:
    """PostgreSQL: gather the planner's statistics of the tables an import filled, in its transaction.

    Until autovacuum's next pass (up to a minute after a load) PostgreSQL plans without them, and a read
    planned blind can take a nested loop over a whole table: the recent-events read took 74 s that way
    right after a bulk load (docs/benchmarks.md). SQLite plans without statistics; nothing is run there."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ANALYZE events, users, items")


def insert_event_rows(
    conn: Connection, rows: list[dict[str, Any]], progress: Callable[[int], None] | None = None
) -> int:
    """``insert_events`` for plain dicts (keys `app.eventfiles.EVENT_COLUMNS`, value None when absent): no
    pandas on the HTTP path."""
    if not rows:
        return 0
    users = upsert_users(conn, {r["user_id"] for r in rows})
    items = upsert_items(conn, {r["item_id"] for r in rows})
    return _insert_records(conn, _records(rows, users, items), progress, None)


def insert_new_events(conn: Connection, rows: list[dict[str, Any]], ids: IdCache,
                      records: list[Record] | None = None) -> dict[str, int]:
    """``insert_event_rows`` that names the ``event_id``s it stored (the others were there already), each
    with its ``events.id``.

    The group commit of POST /v1/events writes several requests in one transaction and needs each
    request's own count of new events, and each worker's view of recent events (app/api/recent.py) the
    ids it need not read back. ``ids`` caches internal user and item ids across transactions
    (the caller drops it when a transaction rolls back): most events name known users and items, and
    looking them up again would cost more than the insert. ``records``: the rows' ``cached_records``,
    made beforehand (the group committer makes them before it takes the write lock).
    """
    if not rows:
        return {}
    if records is None:
        ids.resolve(conn, {r["user_id"] for r in rows}, {r["item_id"] for r in rows})
        records = _in_user_order(_records(rows, ids.users, ids.items))
    new: dict[str, int] = {}
    _insert_records(conn, records, None, new)
    return new


async def resolve_ids_async(conn: psycopg.AsyncConnection, ids: IdCache, users: set[str], items: set[str]) -> None:
    """``IdCache.resolve`` on an autocommit psycopg AsyncConnection, for the group committer's short path:
    the users and items the cache lacks are created (``ON CONFLICT DO NOTHING``: another worker may create
    the same one at the same moment) and read back, two statements per table with misses. Each commits as
    it runs, so the ids are real whatever becomes of the events that named them (a user or item without
    events is what an import of its catalogue row leaves too)."""
    ids.bound()
    for table, cache, wanted in (("users", ids.users, users), ("items", ids.items, items)):
        missing = [w for w in wanted if w not in cache]
        if missing:
            await conn.execute(f"INSERT INTO {table} (external_id) SELECT unnest(%s::text[]) "
                               "ON CONFLICT (external_id) DO NOTHING", (missing,))
            cursor = await conn.execute(f"SELECT external_id, id FROM {table} WHERE external_id = ANY(%s)",
                                        (missing,))
            cache.update(await cursor.fetchall())


async def insert_known_events_async(conn: psycopg.AsyncConnection, records: list[Record]) -> dict[str, int]:
    """``insert_new_events`` for a group whose users and items are all known (its ``cached_records``, at
    most ``VALUES_MAX``), on an autocommit psycopg AsyncConnection: one statement, committed as it runs;
    returns the ``event_id``s it stored with their ``events.id``. PostgreSQL's group committer runs on
    the event loop with it (app/api/ingest.py)."""
    flat = tuple(value for record in records for value in record)
    cursor = await conn.execute(_values_sql(len(records), "%s", True), flat)
    return dict(await cursor.fetchall())


def cached_records(rows: list[dict[str, Any]], ids: IdCache) -> list[Record] | None:
    """The rows as records in user order when ``ids`` holds every user and item they name, else None.

    User order (stable: a user's own events keep theirs) updates the user index page after page instead
    of at random places: 15% less work for a SQLite batch of 1000 (docs/benchmarks.md)."""
    try:
        return _in_user_order(_records(rows, ids.users, ids.items))
    except KeyError:
        return None


def _in_user_order(records: list[Record]) -> list[Record]:
    return sorted(records, key=itemgetter(1))  # stable


_COPY_COLUMNS = ("event_id", "user_id", "item_id", "type", "value", "timestamp")
Record = tuple[str, int, int, str, float | None, float]  # _COPY_COLUMNS, internal ids


def _records(rows: list[dict[str, Any]], users: dict[str, int], items: dict[str, int]) -> list[Record]:
    return [
        (r["event_id"], users[r["user_id"]], items[r["item_id"]], r["type"], r["value"], float(r["timestamp"]))
        for r in rows
    ]


def statement_sizes(n: int) -> list[int]:
    """Rows per INSERT for ``n`` rows: one statement up to ``VALUES_MAX``, else powers of two from
    ``CHUNK`` down to 128 and one statement for the rest (< 128 rows). SQLite compiles a statement
    for every new text (~10 ms for 5000 rows, as long as running it); a few sizes stay compiled in the
    driver's statement cache whatever the groups' sizes."""
    if n <= VALUES_MAX:
        return [n] if n else []
    sizes = []
    size = CHUNK
    while n >= 128:
        while size > n:
            size //= 2
        sizes.append(size)
        n -= size
    return sizes + ([n] if n else [])


@lru_cache(maxsize=256)
def _values_sql(rows: int, mark: str, returning: bool) -> str:
    """One multi-row INSERT … ON CONFLICT DO NOTHING [RETURNING event_id, id] (the driver caches it by its text)."""
    one = "(" + ", ".join([mark] * len(_COPY_COLUMNS)) + ")"
    return (
        f"INSERT INTO events ({', '.join(_COPY_COLUMNS)}) VALUES {', '.join([one] * rows)} "
        "ON CONFLICT (event_id) DO NOTHING" + (" RETURNING event_id, id" if returning else "")
    )


def _insert_records(
    conn: Connection,
    records: list[Record],
    progress: Callable[[int], None] | None,
    new: dict[str, int] | None,
) -> int:
    """Insert events in the caller's transaction; the new ``event_id``s (→ ``events.id``) go into ``new``
    when given.

    Plain driver SQL, statements of ``statement_sizes`` rows: SQLAlchemy's per-row parameter handling cost
    more than the database's own work for the HTTP path's small groups.
    """
    if conn.dialect.name == "postgresql" and len(records) > VALUES_MAX:
        return _copy_events_postgres(conn, records, progress, new)
    sqlite = conn.dialect.name == "sqlite"
    inserted = start = 0
    for size in statement_sizes(len(records)):
        part = records[start : start + size]
        start += size
        flat = tuple(value for record in part for value in record)
        if sqlite:
            inserted += _insert_sqlite(conn, part, flat, new)
        else:
            stored = conn.exec_driver_sql(_values_sql(len(part), "%s", True), flat).all()
            inserted += len(stored)
            if new is not None:
                new.update(stored)
        if progress:
            progress(len(part))
    return inserted


def _insert_sqlite(conn: Connection, part: list[Record], flat: tuple[Any, ...], new: dict[str, int] | None) -> int:
    """One SQLite INSERT without RETURNING: how many rows were new, and their ids into ``new`` when given.

    Within one statement SQLite gives the new rows consecutive rowids in VALUES order (it holds the write
    lock throughout), so ``rowcount`` and ``lastrowid`` name them; only when some were duplicates are they
    read back, by that id range. RETURNING steps once per row, and the sqlite3 module lets go of the GIL
    at every step: with the write lock held, each step waited for the event loop to hand the interpreter
    back (docs/benchmarks.md, "Event ingestion").
    """
    result = conn.exec_driver_sql(_values_sql(len(part), "?", False), flat)
    count, last = max(result.rowcount, 0), result.lastrowid
    if count and new is not None:
        first = last - count + 1
        if count == len(part):
            new.update((record[0], first + k) for k, record in enumerate(part))
        else:
            new.update(conn.exec_driver_sql("SELECT event_id, id FROM events WHERE id BETWEEN ? AND ?",
                                            (first, last)).all())
    return count


def _copy_events_postgres(
    conn: Connection,
    records: list[Record],
    progress: Callable[[int], None] | None,
    new: dict[str, int] | None,
) -> int:
    """COPY into a temporary table, then one INSERT … ON CONFLICT: several times faster than executemany."""
    cols = ", ".join(f'"{c}"' for c in _COPY_COLUMNS)
    cursor = conn.connection.dbapi_connection.cursor()  # psycopg 3, inside the caller's transaction
    try:
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS _incoming_events (event_id text, user_id bigint, item_id bigint, "
            "type text, value double precision, timestamp double precision) ON COMMIT DELETE ROWS"
        )
        cursor.execute("TRUNCATE _incoming_events")
        with cursor.copy(f"COPY _incoming_events ({cols}) FROM STDIN") as copy:
            for start in range(0, len(records), CHUNK):
                part = records[start : start + CHUNK]
                for row in part:
                    copy.write_row(row)
                if progress:
                    progress(len(part))
        returning = " RETURNING event_id, id" if new is not None else ""
        cursor.execute(
            f"INSERT INTO events ({cols}) SELECT {cols} FROM _incoming_events "
            f"ORDER BY timestamp ON CONFLICT (event_id) DO NOTHING{returning}"
        )
        if new is None:
            return max(cursor.rowcount, 0)
        stored = cursor.fetchall()
        new.update(stored)
        return len(stored)
    finally:
        cursor.close()


def count_events(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(Event)).scalar_one())


def max_event_id(conn: Connection) -> int:
    """The newest events.id: a watermark for "everything up to here"."""
    return int(conn.execute(select(func.coalesce(func.max(Event.id), 0))).scalar_one())


def read_events(engine: Engine, until_id: int | None = None, since_id: int | None = None) -> pd.DataFrame:
    """All events (optionally id in (since_id, until_id]) with external ids, ordered by id.

    Columns: id, user_id, item_id, timestamp, type, value, event_id.
    """
    stmt = (
        select(
            Event.id,
            User.external_id.label("user_id"),
            Item.external_id.label("item_id"),
            Event.timestamp,
            Event.type,
            Event.value,
            Event.event_id,
        )
        .join(User, User.id == Event.user_id)
        .join(Item, Item.id == Event.item_id)
        .order_by(Event.id)
    )
    if until_id is not None:
        stmt = stmt.where(Event.id <= until_id)
    if since_id is not None:
        stmt = stmt.where(Event.id > since_id)
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=50_000).execute(stmt)
        chunks = [pd.DataFrame(part, columns=list(result.keys())) for part in result.partitions()]
    if not chunks:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _EMPTY_DTYPES.items()})
    frame = pd.concat(chunks, ignore_index=True)
    frame["id"] = frame["id"].astype(np.int64)
    frame["timestamp"] = frame["timestamp"].astype(np.float64)
    frame["value"] = frame["value"].astype(np.float64)
    return frame


_EMPTY_DTYPES = {
    "id": "int64",
    "user_id": "object",
    "item_id": "object",
    "timestamp": "float64",
    "type": "object",
    "value": "float64",
    "event_id": "object",
}


# (user_id, item_id) per served item: each impressions row holds its list as a JSON array of item ids.
_SERVED_PAIRS = {
    "sqlite": "SELECT imp.user_id, j.value AS item_id FROM impressions AS imp, json_each(imp.item_ids) AS j",
    "postgresql": (
        "SELECT imp.user_id, CAST(j.value AS BIGINT) AS item_id FROM impressions AS imp "
        "CROSS JOIN LATERAL json_array_elements_text(CAST(imp.item_ids AS json)) AS j(value)"
    ),
}


def read_ignored_impressions(engine: Engine) -> pd.DataFrame:
    """Distinct (user_id, item_id) pairs that were served but never got an event from that user.

    The most realistic negatives there are: the user saw the item and passed it over. The served lists
    are expanded in SQL and deduplicated before the events are probed, so each pair is looked up once;
    items deleted since they were served drop out in the join.
    """
    stmt = text(
        f"WITH served AS (SELECT DISTINCT user_id, item_id FROM ({_SERVED_PAIRS[engine.dialect.name]}) AS p) "
        "SELECT u.external_id AS user_id, i.external_id AS item_id FROM served AS s "
        "JOIN users AS u ON u.id = s.user_id JOIN items AS i ON i.id = s.item_id "
        "WHERE NOT EXISTS (SELECT 1 FROM events AS e WHERE e.user_id = s.user_id AND e.item_id = s.item_id)"
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return pd.DataFrame(rows, columns=["user_id", "item_id"], dtype=object)


class IdCache:
    """External → internal ids of users and items, so a batch of impressions is one plain INSERT.

    Ids never change once assigned, so entries never go stale; the cache is cleared when it grows past
    ``limit`` entries to bound memory. Misses are looked up with one SELECT; only ids still missing are
    upserted (a cold user seen for the first time).
    """

    def __init__(self, limit: int = 2_000_000) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.limit = limit

    @staticmethod
    def _fill(
        conn: Connection, model: type[User] | type[Item], cache: dict[str, int], wanted: set[str]
    ) -> None:
        missing = [w for w in wanted if w not in cache]
        if not missing:
            return
        # plain driver SQL: compiling an expanding IN per batch cost more than running it
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        for start in range(0, len(missing), 5000):
            part = missing[start : start + 5000]
            sql = (
                f"SELECT external_id, id FROM {model.__tablename__} "
                f"WHERE external_id IN ({', '.join([mark] * len(part))})"
            )
            cache.update(conn.exec_driver_sql(sql, tuple(part)).all())
        still = [w for w in missing if w not in cache]
        if still:
            cache.update((upsert_users if model is User else upsert_items)(conn, still))

    def warm(self, conn: Connection, per_table: int) -> int:
        """Load the newest ``per_table`` users and items (the likeliest to have events next); the entries held.

        After a restart every event would otherwise pay a lookup until the cache filled, one more round
        trip per group on PostgreSQL (bench/serve.py: single events +40% with the cache warm).
        """
        per_table = min(per_table, self.limit // 2)
        for model, cache in ((User, self.users), (Item, self.items)):
            sql = f"SELECT external_id, id FROM {model.__tablename__} ORDER BY id DESC LIMIT {int(per_table)}"
            cache.update(conn.exec_driver_sql(sql).all())
        return len(self.users) + len(self.items)

    def bound(self) -> None:
        """Start over once past ``limit`` entries (before a lookup, never between a lookup and its use)."""
        if len(self.users) + len(self.items) > self.limit:
            self.users.clear()
            self.items.clear()

    def resolve(self, conn: Connection, users: set[str], items: set[str]) -> None:
        self.bound()
        self._fill(conn, User, self.users, users)
        self._fill(conn, Item, self.items, items)
