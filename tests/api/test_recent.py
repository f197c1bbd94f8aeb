"""The in-memory view of events since the watermark: ids that commit out of order are not missed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from app.api.recent import RecentEventsView
from app.db.engine import make_engine
from app.db.events import insert_event_rows
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


def test_an_id_committed_late_is_picked_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'recsys.db'}"
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
