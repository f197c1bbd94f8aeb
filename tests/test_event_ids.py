"""`insert_new_events` names exactly the events it stored, each with its `events.id`.

On SQLite the ids come from the statement's `rowcount` and `lastrowid` (no RETURNING), read back by id
range only when some rows were duplicates; the names must match the table wherever the duplicates sit.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.db.engine import make_engine
from app.db.events import IdCache, insert_new_events
from app.db.migrate import upgrade


def _events(*ids: str) -> list[dict]:
    return [{"event_id": e, "user_id": f"u{n % 3}", "item_id": f"i{n}", "type": "click", "value": None,
             "timestamp": float(n)} for n, e in enumerate(ids)]


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transaction"])
def test_new_events_are_named_with_their_ids_wherever_the_duplicates_sit(db_url: str, autocommit: bool) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    ids = IdCache()
    returned: dict[str, int] = {}
    batches = [
        ("a", "b", "c"),
        ("a", "d", "e"),  # duplicate first
        ("f", "b", "g"),  # duplicate in the middle
        ("h", "i", "c"),  # duplicate last
        ("a", "b"),  # nothing new
    ]
    with engine.connect() as conn:
        if autocommit:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for batch in batches:
            with conn.begin():
                new = insert_new_events(conn, _events(*batch), ids)
            assert not set(new) & set(returned), "an event named new twice"
            returned.update(new)
        stored = dict(conn.execute(text("SELECT event_id, id FROM events")).all())
    assert returned == stored
    assert sorted(stored) == list("abcdefghi")
