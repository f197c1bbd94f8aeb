"""The in-memory view of events since the watermark: ids that commit out of order are not missed."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from app.api import recent
from app.api.recent import RecentEventsView
from app.db.engine import make_engine
from app.db.events import IdCache, insert_event_rows, insert_new_events
from app.db.migrate import upgrade


def _event(n: int, user: str, item: str) -> dict:
    return {
        "event_id": f"e{n}",
        "user_id": user,
        "item_id": item,
        "type": "click",
        "value": None,
        "timestamp": 1.0,
    }


def test_an_id_committed_late_is_picked_up(fresh_url: str) -> None:
    url = fresh_url
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        insert_event_rows(conn, [_event(1, "u1", "i1"), _event(2, "u1", "i2"), _event(3, "u2", "i3")])
        late = conn.execute(text("SELECT * FROM events ORDER BY id LIMIT 1 OFFSET 1")).mappings().one()
        conn.execute(text("DELETE FROM events WHERE id = :id"), {"id": late["id"]})  # "not committed yet"
    view = RecentEventsView(engine)
    view._rebuild(0)
    assert view.items_for("u1", 0) == ["i1"] and view.items_for("u2", 0) == ["i3"]
    assert late["id"] in view._gaps

    with engine.begin() as conn:  # the slow transaction commits, with the id it was given earlier
        cols = ", ".join(late.keys())
        conn.execute(
            text(f"INSERT INTO events ({cols}) VALUES ({', '.join(':' + c for c in late)})"),
            dict(late),
        )
    view._tail(view._last_id)
    view._fill_gaps()
    assert sorted(view.items_for("u1", 0)) == ["i1", "i2"] and not view._gaps

    with engine.begin() as conn:  # new events still arrive through the tail
        insert_event_rows(conn, [_event(4, "u2", "i4")])
    view._tail(view._last_id)
    assert sorted(view.items_for("u2", 0)) == ["i3", "i4"]
    engine.dispose()


def test_the_tail_leaves_this_workers_own_events_out(fresh_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events this worker committed reach the view from the committer, with their ids; the tail reads
    only the others' and still notes a real gap (an id whose transaction has not committed). The users
    and items the tail reads are named one lookup at a time here (chunks of one id)."""
    monkeypatch.setattr(recent, "NAMES_CHUNK", 1)
    url = fresh_url
    upgrade(url)
    engine = make_engine(url)
    view = RecentEventsView(engine, negative_types={"dislike"})
    view._rebuild(0)

    def store(*events: dict) -> list[tuple[int, str, str, str]]:
        with engine.connect() as conn, conn.begin():
            new = insert_new_events(conn, list(events), IdCache())
        return [(new[e["event_id"]], e["user_id"], e["item_id"], e["type"]) for e in events]

    mine = store(_event(1, "u1", "i1"), _event(2, "u1", "i2"))
    # told as dislikes while the rows say click: a tail that read them back would add the click's bit
    view.add_committed([(i, u, item, "dislike") for i, u, item, _ in mine])
    # another worker's, around an id whose transaction has not committed yet (one user: a group is
    # written in user order, and a user's own events keep theirs)
    theirs = store(_event(3, "u2", "i3"), _event(4, "u2", "i4"), _event(5, "u2", "i5"))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE event_id = 'e4'"))
    mine += store(_event(6, "u1", "i6"))
    view.add_committed([(i, u, item, "dislike") for i, u, item, _ in mine[2:]])

    view._tail(view._last_id)
    assert view.events_for("u1", 0) == (["i6", "i2", "i1"], [], ["i6", "i2", "i1"])  # none read back
    assert view.events_for("u2", 0) == (["i5", "i3"], ["i5", "i3"], [])  # the other worker's
    assert list(view._gaps) == [theirs[1][0]]  # the uncommitted id, not this worker's
    assert view._last_id == mine[-1][0] and view._own == []  # past its own runs, which are dropped
    assert view._count == 5
    engine.dispose()


def test_too_many_events_since_the_watermark_are_counted_not_read(tmp_path: Path) -> None:
    """Over ``max_events`` the view gives up and recommendations ask the database: a rebuild decides that
    from a count, without reading the events first; a view that fits overflows once its tail passes the
    bound. Repeated (user, item) pairs count as the events they are."""
    url = f"sqlite:///{tmp_path / 'recsys.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        insert_event_rows(conn, [_event(n, "u1", "i1") for n in range(5)])

    crowded = RecentEventsView(engine, max_events=4)
    crowded._rebuild(0)
    assert crowded.overflow and crowded.watermark == 0
    assert crowded.items_for("u1", 0) is None and crowded._users == {} and crowded._last_id == 0

    fits = RecentEventsView(engine, max_events=5)
    fits._rebuild(0)
    assert not fits.overflow and fits.items_for("u1", 0) == ["i1"]
    with engine.begin() as conn:
        insert_event_rows(conn, [_event(5, "u2", "i2")])
    fits._tail(fits._last_id)
    assert fits.overflow and fits.items_for("u2", 0) is None
    engine.dispose()


def test_the_tail_reads_in_windows_of_ids_and_notes_gaps_between_them(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read covers at most TAIL_BATCH ids (2 here); ids missing inside a window that has committed
    ids above it, or at the end of one, are gaps, picked up once they commit."""
    monkeypatch.setattr(recent, "TAIL_BATCH", 2)
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with engine.begin() as conn:
        insert_event_rows(conn, [_event(n, f"u{n % 2}", f"i{n}") for n in range(1, 8)])
        late = [dict(r) for r in conn.execute(text("SELECT * FROM events WHERE id IN (4, 5) ORDER BY id")).mappings()]
        conn.execute(text("DELETE FROM events WHERE id IN (4, 5)"))  # "not committed yet"
    view = RecentEventsView(engine)
    view._rebuild(0)
    assert sorted(view._gaps) == [4, 5] and view._last_id == 7 and view._count == 5
    assert view.items_for("u1", 0) == ["i1", "i3", "i7"] and view.items_for("u0", 0) == ["i2", "i6"]

    with engine.begin() as conn:
        for row in late:
            cols = ", ".join(row)
            conn.execute(text(f"INSERT INTO events ({cols}) VALUES ({', '.join(':' + c for c in row)})"), row)
    view._tail(view._last_id)  # nothing above 7
    view._fill_gaps()
    assert not view._gaps and view.items_for("u0", 0) == ["i2", "i6", "i4"] and view._count == 7
    engine.dispose()


def test_a_gap_that_never_commits_is_looked_up_less_and_less_often(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolled-back insert or a duplicate leaves an id that never appears: it is looked up on the next
    tick, then after as long again as it has been missing, and forgotten after GAP_SECONDS."""
    from sqlalchemy import event

    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with engine.begin() as conn:
        insert_event_rows(conn, [_event(n, "u1", f"i{n}") for n in range(1, 4)])
        conn.execute(text("DELETE FROM events WHERE id = 2"))  # never committed
    clock = [100.0]
    monkeypatch.setattr(recent.time, "monotonic", lambda: clock[0])
    lookups: list[float] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ANN202
        if " IN " in statement and "FROM events" in statement:
            lookups.append(clock[0])

    view = RecentEventsView(engine, interval=0.25)
    view._rebuild(0)
    assert list(view._gaps) == [2]
    for now in (100.0, 100.1, 100.3, 100.5, 100.7, 101.0, 101.5, 102.5, 159.0, 160.5):
        clock[0] = now
        view._fill_gaps()
    # due at once, then 0.25 s later (at least a tick), then after as long again as it had been missing
    assert lookups == [100.0, 100.3, 100.7, 101.5, 159.0]
    assert not view._gaps and view.items_for("u1", 0) == ["i1", "i3"]
    engine.dispose()
