"""RECSYS_* variables: read as a user writes them (a trailing newline from a file), refused by name when wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_support import environment, recsys

from app.settings import Settings, SettingsError, get_settings


def test_a_url_ending_in_a_newline_names_the_same_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECSYS_DATABASE_URL", f"sqlite:///{tmp_path}/recsys.db\n")
    monkeypatch.setenv("RECSYS_ADMIN_TOKEN", " secret\n")
    settings = Settings()
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path}/recsys.db"
    assert settings.admin_token == "secret"
    monkeypatch.setenv("RECSYS_DATABASE_URL", "postgres://u@h:5432/db\n")
    assert Settings().sqlalchemy_url == "postgresql+psycopg://u@h:5432/db"


def test_a_bad_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_DATABASE_URL", "127.0.0.1:5432/test")
    monkeypatch.setenv("RECSYS_EVENT_WEIGHTS", '{"view": "much"}')
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as err:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(err.value)
    assert "RECSYS_DATABASE_URL='127.0.0.1:5432/test': not a database URL" in message
    assert "RECSYS_EVENT_WEIGHTS [view]='much'" in message
    monkeypatch.delenv("RECSYS_EVENT_WEIGHTS")
    monkeypatch.delenv("RECSYS_DATABASE_URL")
    for name, value, says in [
        ("RECSYS_DATABASE_URL", "mysql://u@h/db", "unsupported database 'mysql': the service runs on SQLite"),
        ("RECSYS_DATABASE_URL", "postgresql+asyncpg://u@h/db", "unsupported database 'postgresql+asyncpg'"),
        ("RECSYS_PORT", "70000", "RECSYS_PORT='70000': Input should be less than or equal to 65535"),
        ("RECSYS_WORKERS", "0", "RECSYS_WORKERS='0': Input should be greater than or equal to 1"),
    ]:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(SettingsError, match=re.escape(says)):
                get_settings()
            get_settings.cache_clear()
    monkeypatch.setenv("RECSYS_NEGATIVE_TYPES", "dislike,skip")  # a list must be JSON
    try:
        with pytest.raises(SettingsError, match=r"RECSYS_NEGATIVE_TYPES='dislike,skip': not JSON \(Expecting value"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_the_cli_says_which_variable_is_wrong_without_a_traceback(tmp_path: Path) -> None:
    done = recsys(environment(RECSYS_PORT="eighty", RECSYS_DATA_DIR=str(tmp_path)), "db", "current")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: invalid setting: RECSYS_PORT='eighty': Input should be a valid integer")
    assert "Traceback" not in done.stderr


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = recsys(environment(RECSYS_DATA_DIR=str(blocker)), "db", "upgrade")
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"error: [Errno 17] File exists: '{blocker}'\n"


def test_a_database_that_cannot_be_reached_is_one_line() -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1
    done = recsys(environment(RECSYS_DATABASE_URL=nowhere), "models", "list")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: the database is unavailable (connection failed: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
