"""Impressions, one row per served list: writer, trainer's reader, and the migration that converts old rows."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Engine, column, inspect, select, table, text

from app.db.engine import make_engine
from app.db.events import insert_event_rows, read_ignored_impressions, upsert_items, upsert_users
from app.db.impressions import (
    IdCache,
    ImpressionWriter,
    Served,
    decode_item_ids,
    encode_item_ids,
    write_impressions,
)
from app.db.migrate import downgrade, upgrade
from app.db.models import Impression, Item, User

OLD_COLUMNS = "request_id, user_id, item_id, model_version, rank, served_at"
OLD_TABLE = table(
    "impressions",
    *(column(c) for c in OLD_COLUMNS.split(", ")[:-1]),
    column("served_at", DateTime(timezone=True)),
)  # schema 0001: one row per served item


def _pairs(engine: Engine) -> set[tuple[str, str]]:
    frame = read_ignored_impressions(engine)
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


def _event(user: str, item: str, n: int) -> dict:
    return {
        "event_id": f"e{n}",
        "user_id": user,
        "item_id": item,
        "type": "click",
        "value": None,
        "timestamp": float(n),
    }


def _lists(engine: Engine) -> list[tuple[str, str, str | None, list[str]]]:
    """(request id, user, model, external item ids in rank order) per stored list, in id order."""
    with engine.connect() as conn:
        items = dict(conn.execute(select(Item.id, Item.external_id)).all())
        users = dict(conn.execute(select(User.id, User.external_id)).all())
        rows = conn.execute(
            select(
                Impression.request_id, Impression.user_id, Impression.model_version, Impression.item_ids
            ).order_by(Impression.id)
        ).all()
    return [(r, users[u], m, [items[i] for i in decode_item_ids(ids)]) for r, u, m, ids in rows]


def test_item_ids_round_trip() -> None:
    assert encode_item_ids([12, 7, 31]) == "[12,7,31]"
    assert decode_item_ids("[12,7,31]") == [12, 7, 31]
    assert decode_item_ids(" [ 5 ] ") == [5] and decode_item_ids("[]") == []


def test_one_row_per_list_and_ignored_pairs(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            insert_event_rows(conn, [_event("u1", "b", 1), _event("u2", "a", 2)])
            batch = [
                Served("r1", "u1", ["a", "b", "c"], "v1"),
                Served("r2", "u2", ["a", "b"], None),
                Served("r3", "u1", ["c", "a"], "v1"),  # c and a again: pairs are distinct
                Served("r4", "u3", [], "v1"),  # nothing served, nothing written
            ]
            assert write_impressions(conn, batch, IdCache()) == 3
        assert _lists(engine) == [
            ("r1", "u1", "v1", ["a", "b", "c"]),
            ("r2", "u2", None, ["a", "b"]),
            ("r3", "u1", "v1", ["c", "a"]),
        ]
        frame = read_ignored_impressions(engine)
        assert len(frame) == len(set(zip(frame["user_id"], frame["item_id"], strict=True)))
        assert _pairs(engine) == {("u1", "a"), ("u1", "c"), ("u2", "b")}
        assert {ix["name"] for ix in inspect(engine).get_indexes("impressions")} == {
            "ix_impressions_request_id"
        }
    finally:
        engine.dispose()


def test_writer_drains_on_close_and_counts_drops(tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'recsys.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        writer = ImpressionWriter(engine, max_queue=3, batch=2, interval=60.0)
        for n in range(5):  # not started yet: the queue fills, then lists are dropped and counted
            writer.submit(Served(f"r{n}", "u1", ["a", "b"], "v1"))
        assert writer.dropped == 2
        writer.start()
        writer.close()
        assert writer.written == 3 and writer.failed == 0
        assert [r for r, *_ in _lists(engine)] == ["r0", "r1", "r2"]
    finally:
        engine.dispose()


def test_migration_converts_rows_both_ways(db_url: str) -> None:
    """Old per-item rows become per-list rows and back, with the same ignored pairs at every revision."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            users = upsert_users(conn, ["u1", "u2"])
            items = upsert_items(conn, ["a", "b", "c", "d"])
            insert_event_rows(conn, [_event("u1", "b", 1)])
            t1, t2 = datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2026, 1, 2, 8, tzinfo=UTC)
            old = [
                ("r1", users["u1"], items["a"], "v1", 1, t1),
                ("r2", users["u2"], items["c"], None, 1, t1),  # interleaved with r1, as two workers write
                ("r1", users["u1"], items["b"], "v1", 2, t1),
                ("r2", users["u2"], items["d"], None, 2, t1),
                ("r1", users["u1"], items["c"], "v1", 3, t1),
                ("r1", users["u1"], items["d"], "v1", 1, t2),  # a client reused r1: a second list
                ("r1", users["u1"], items["a"], "v1", 2, t2),
            ]
            conn.execute(OLD_TABLE.insert(), [dict(zip(OLD_TABLE.c.keys(), row, strict=True)) for row in old])
            before = conn.execute(text(f"SELECT {OLD_COLUMNS} FROM impressions ORDER BY id")).all()
        expected = {("u1", "a"), ("u1", "c"), ("u1", "d"), ("u2", "c"), ("u2", "d")}
        assert _pairs_0001(engine) == expected

        upgrade(db_url)
        assert sorted(_lists(engine)) == [
            ("r1", "u1", "v1", ["a", "b", "c"]),
            ("r1", "u1", "v1", ["d", "a"]),
            ("r2", "u2", None, ["c", "d"]),
        ]
        with engine.connect() as conn:
            served = dict(
                conn.execute(text("SELECT item_ids, served_at FROM impressions")).all()
            )  # as stored
        assert served[encode_item_ids([items["d"], items["a"]])] == before[5].served_at
        assert served[encode_item_ids([items["a"], items["b"], items["c"]])] == before[0].served_at
        assert _pairs(engine) == expected
        with engine.begin() as conn:  # and new lists go on being written after the conversion
            write_impressions(conn, [Served("r9", "u2", ["a"], "v2")])

        downgrade(db_url, "0001")
        with engine.connect() as conn:
            after = [tuple(r) for r in conn.execute(text(f"SELECT {OLD_COLUMNS} FROM impressions")).all()]
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("impressions")}
        added = [r for r in after if r[0] == "r9"]
        assert [r[:5] for r in added] == [("r9", users["u2"], items["a"], "v2", 1)]
        assert sorted(r for r in after if r[0] != "r9") == sorted(tuple(r) for r in before)
        assert indexes == {"ix_impressions_request_id", "ix_impressions_user_id_served_at"}
        assert "_impressions_staging" not in inspect(engine).get_table_names()
        assert _pairs_0001(engine) == expected | {("u2", "a")}
        upgrade(db_url)  # and up again
        assert len(_lists(engine)) == 4
    finally:
        engine.dispose()


def _pairs_0001(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT u.external_id, i.external_id FROM impressions AS m JOIN users AS u ON u.id = m.user_id "
                "JOIN items AS i ON i.id = m.item_id WHERE NOT EXISTS (SELECT 1 FROM events AS e "
                "WHERE e.user_id = m.user_id AND e.item_id = m.item_id)"
            )
        ).all()
    return set(map(tuple, rows))
