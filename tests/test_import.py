"""`recsys import`/`export`: both MovieLens formats, idempotency, and all-or-nothing refusal of bad files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import app
from app.db.engine import make_engine
from app.db.events import count_events, read_events
from app.db.migrate import upgrade
from app.eventfiles import EventFileError, read_event_file
from app.settings import get_settings

runner = CliRunner()


@pytest.fixture
def db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The CLI pointed at a freshly migrated database."""
    monkeypatch.setenv("RECSYS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    upgrade(db_url)
    yield db_url
    get_settings.cache_clear()


def _movielens_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pairs = rng.choice(50 * 80, size=n, replace=False)
    return pd.DataFrame(
        {
            "user": pairs // 80 + 1,
            "item": pairs % 80 + 1,
            "rating": rng.integers(1, 6, n),
            "ts": 880_000_000 + rng.integers(0, 10_000_000, n),
        }
    )


def write_u_data(path: Path, n: int = 500) -> Path:
    _movielens_frame(n).to_csv(path, sep="\t", header=False, index=False)
    return path


def write_ratings_csv(path: Path, n: int = 500) -> Path:
    frame = _movielens_frame(n, seed=1)
    frame["rating"] = frame["rating"] / 2 + 0.5  # half stars, as in ml-latest
    frame.columns = ["userId", "movieId", "rating", "timestamp"]
    frame.to_csv(path, index=False)
    return path


def _count(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        n = count_events(conn)
    engine.dispose()
    return n


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_import_u_data_counts_and_idempotent_reimport(db: str, tmp_path: Path) -> None:
    path = write_u_data(tmp_path / "u.data", 500)
    result = invoke("import", str(path))
    assert result.exit_code == 0, result.output
    assert "500 new" in result.output
    assert _count(db) == 500
    again = invoke("import", str(path), "--format", "movielens-100k")
    assert again.exit_code == 0 and "0 new, 500 already present" in again.output
    assert _count(db) == 500
    events = read_events(make_engine(db))
    source = pd.read_csv(path, sep="\t", header=None, names=["u", "i", "r", "t"])
    assert events["user_id"].nunique() == source["u"].nunique()
    assert events["item_id"].nunique() == source["i"].nunique()
    assert set(events["type"]) == {"rating"}
    assert sorted(events["value"]) == sorted(source["r"].astype(float))


def test_import_leaves_postgresql_with_planner_statistics(postgres_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A table PostgreSQL never analysed has reltuples -1 and no column statistics; autovacuum would
    gather them only on its next pass, and reads planned blind meanwhile can be very slow."""
    from app.db.migrate import downgrade

    downgrade(postgres_url, "base")
    upgrade(postgres_url)
    monkeypatch.setenv("RECSYS_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    try:
        result = invoke("import", str(write_u_data(tmp_path / "u.data", 500)))
        assert result.exit_code == 0, result.output
        engine = make_engine(postgres_url)
        with engine.connect() as conn:
            tuples = dict(conn.exec_driver_sql(
                "SELECT relname, reltuples FROM pg_class WHERE relname IN ('events', 'users', 'items')").all())
            columns = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stats WHERE tablename = 'events' AND attname IN ('id', 'user_id')").scalar()
        engine.dispose()
        assert tuples == {"events": 500, "users": 50, "items": 80}
        assert columns == 2
    finally:
        get_settings.cache_clear()
        downgrade(postgres_url, "base")


def test_import_ratings_csv_keeps_half_star_values(db: str, tmp_path: Path) -> None:
    path = write_ratings_csv(tmp_path / "ratings.csv", 400)
    result = invoke("import", str(path))
    assert result.exit_code == 0, result.output
    assert _count(db) == 400
    events = read_events(make_engine(db))
    assert {v % 1 for v in events["value"]} <= {0.0, 0.5}
    assert events["timestamp"].min() >= 880_000_000


def test_generic_csv_with_event_ids_and_export_round_trip(db: str, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,timestamp,type,value,event_id\n"
        "alice,book-1,1700000000,click,,e1\n"
        "alice,book-2,1700000100,dislike,,e2\n"
        "bob,book-1,1700000200,rating,4.5,e3\n"
    )
    assert invoke("import", str(path)).exit_code == 0
    out = tmp_path / "export.parquet"
    result = invoke("export", "--out", str(out))
    assert result.exit_code == 0, result.output
    back = read_event_file(out)
    assert back.sort_values("event_id")["event_id"].tolist() == ["e1", "e2", "e3"]
    assert back.set_index("event_id").loc["e2", "type"] == "dislike"
    assert back.set_index("event_id").loc["e3", "value"] == 4.5
    # The export imports back as the same events: nothing new.
    assert "0 new" in invoke("import", str(out)).output


def test_iso_8601_timestamps_in_files_are_read_as_epoch_seconds(tmp_path: Path) -> None:
    """A warehouse export carries date-time text, a Parquet file a datetime column: both read as the same
    epoch seconds a number would give (no offset means UTC), beside plain numbers in the same file."""
    csv = tmp_path / "events.csv"
    csv.write_text(
        "user_id,item_id,timestamp\n"
        "u,a,1796638500\n"
        "u,b,2026-12-07T10:15:00Z\n"
        "u,c,2026-12-07T12:15:00.250+02:00\n"
        "u,d,2026-12-07 10:15:00\n"
        "u,e,2026-12-07\n"
    )
    got = read_event_file(csv)["timestamp"].tolist()
    assert got == [1_796_638_500.0, 1_796_638_500.0, 1_796_638_500.25, 1_796_638_500.0, 1_796_601_600.0]
    moments = pd.to_datetime(["2026-12-07T11:15:00", "2026-12-07T11:15:00.5"], format="ISO8601").tz_localize("Europe/Paris")
    parquet = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": ["u", "v"], "item_id": ["a", "b"], "timestamp": moments}).to_parquet(parquet)
    assert read_event_file(parquet)["timestamp"].tolist() == [1_796_638_500.0, 1_796_638_500.5]


BAD_FILES = {
    "column count": ("u.data", b"1\t2\t3\t881250949\n1\t2\t3\n", ":2: expected 4 fields"),
    "extra column": ("u.data", b"1\t2\t3\t881250949\n1\t3\t3\t881250949\t9\n", ":2: expected 4 fields"),
    "non-numeric timestamp": (
        "ratings.csv",
        b"userId,movieId,rating,timestamp\n1,2,3.5,964982703\n1,3,4.0,yesterday\n",
        ":3: timestamp is neither epoch seconds nor an ISO 8601 date-time",
    ),
    "empty file": ("u.data", b"", "empty"),
    "wrong encoding": (
        "events.csv",
        "user_id,item_id\nu1,i1\nJosé,i2\n".encode("latin-1"),
        ":3: not valid UTF-8",
    ),
    "missing column": ("events.csv", b"user,item\n1,2\n", "missing column"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_file_is_refused_and_database_unchanged(db: str, tmp_path: Path, case: str) -> None:
    good = write_u_data(tmp_path / "good.data", 50)
    assert invoke("import", str(good)).exit_code == 0
    name, content, expected = BAD_FILES[case]
    # A long valid prefix: the bad line comes after rows that would otherwise have been written.
    bad = tmp_path / name
    bad.write_bytes(content)
    result = invoke("import", str(bad))
    assert result.exit_code == 1
    assert expected in result.output
    assert "nothing was imported" in result.output
    assert _count(db) == 50


def test_bad_line_after_many_good_ones_imports_nothing(db: str, tmp_path: Path) -> None:
    path = write_u_data(tmp_path / "u.data", 3000)
    with path.open("a") as f:
        f.write("7\t8\tnine\tten\n")
    result = invoke("import", str(path))
    assert result.exit_code == 1 and ":3001: timestamp is neither epoch seconds" in result.output
    assert _count(db) == 0


def test_import_refuses_unmigrated_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("RECSYS_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    result = invoke("import", str(write_u_data(tmp_path / "u.data", 10)))
    get_settings.cache_clear()
    assert result.exit_code == 1
    assert "run `recsys db upgrade`" in result.output


def test_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", str(tmp_path / "x"), "--format", "xml"])
    assert result.exit_code == 2
    with pytest.raises(EventFileError, match="unknown format"):
        read_event_file(tmp_path / "x", "xml")


def test_a_directory_or_a_missing_path_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(EventFileError, match="a directory; give the event file inside it"):
        read_event_file(tmp_path)
    with pytest.raises(EventFileError, match="no such file"):
        read_event_file(tmp_path / "missing.csv")


def test_a_read_for_training_derives_no_event_ids_but_checks_given_ones(tmp_path: Path) -> None:
    """`recsys train` reads without deriving ids (hashing every line is most of a read); a file's own
    ids are still validated."""
    plain = tmp_path / "plain.csv"
    plain.write_text("user_id,item_id\nu1,a\nu1,a\nu2,b\n")
    derived = read_event_file(plain)["event_id"]
    assert derived.str.startswith("h:").all() and derived.nunique() == 3  # a repeated line is its own event
    assert read_event_file(plain, event_ids=False)["event_id"].isna().all()
    given = tmp_path / "given.csv"
    given.write_text("user_id,item_id,event_id\nu1,a,e1\nu2,b,e1\n")
    with pytest.raises(EventFileError, match="event_id repeats"):
        read_event_file(given, event_ids=False)
