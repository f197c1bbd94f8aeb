"""Alembic, driven from code: upgrade, downgrade, and the guard that refuses a stale schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from app.db.engine import SchemaError, make_engine

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a URL (encoded passwords) must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    make_engine(url).dispose()  # creates the SQLite folder
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "-1") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def ensure_current(engine: Engine) -> None:
    """Raise SchemaError, naming the command that fixes it, unless the schema is at head."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise SchemaError(f"database {where} has no schema yet: run `recsys db upgrade`")
    raise SchemaError(
        f"database {where} is at schema revision {current}, this code needs {head}: run `recsys db upgrade`"
    )


def checked_engine(url: str | None = None, *, autocheckpoint: bool = True) -> Engine:
    """An engine for the configured database, refused (SchemaError) unless the schema is current."""
    engine = make_engine(url, autocheckpoint=autocheckpoint)
    try:
        ensure_current(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
