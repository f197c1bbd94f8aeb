"""Configuration from ``RECSYS_*`` environment variables, with defaults that need no setup."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# A suggested starting point for RECSYS_EVENT_WEIGHTS (not the default: unset means unweighted training,
# identical to a run without this feature; see docs/operations.md).
RECOMMENDED_EVENT_WEIGHTS: dict[str, float] = {
    "purchase": 3.0, "add_to_cart": 2.0, "like": 2.0, "share": 2.0, "rating": 1.0, "click": 1.0, "view": 0.3,
}


# the URL schemes the service runs on: SQLite, and PostgreSQL through psycopg 3 (plain URLs get it pinned)
DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql", "postgres", "postgresql+psycopg")


class Settings(BaseSettings):
    """Every field can be set as ``RECSYS_<NAME>`` (for example ``RECSYS_DATA_DIR=/srv/recsys``)."""

    # strip: a value read from a file or an env file often ends in a newline, and a URL ending in one
    # named another SQLite file ("recsys.db\n") without a word
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore", str_strip_whitespace=True)

    data_dir: Path = Field(Path("./var"), description="Holds the SQLite database and the checkpoints.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default is SQLite at DATA_DIR/recsys.db. "
        "PostgreSQL: postgresql+psycopg://user@host:5432/db",
    )
    checkpoint_dir: Path | None = Field(None, description="Default: DATA_DIR/checkpoints.")
    admin_token: str | None = Field(
        None, description="Bearer token for /admin; admin routes are off when unset."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)  # the socket layer would take 70000 as 4464, silently
    workers: int = Field(1, ge=1)
    reload_poll_seconds: float = Field(
        10.0, description="How often the service looks for a newly promoted model."
    )
    top_lists: int = Field(
        100,
        ge=0,
        le=10_000,
        description="Items precomputed per model user after each model load (cached in DATA_DIR/index-cache): "
        "recommendations with k up to this come from the list instead of a search. 0 turns it off.",
    )
    max_batch_events: int = Field(1000, description="Largest batch accepted by POST /v1/events.")
    max_body_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="Largest request body accepted, in bytes: a larger one is answered 413 payload_too_large "
        "before it is read into memory. The default holds any valid batch of 1000 events, even with every "
        "character of its ids escaped (\\uXXXX); raise it too when raising RECSYS_MAX_BATCH_EVENTS.",
    )
    events_queue_max: int = Field(
        20_000,
        ge=1,
        description="Events waiting for a group commit in one worker at most; past it POST /v1/events "
        "answers 503 events_queue_full with Retry-After (a request always fits an empty queue).",
    )
    events_group_max: int = Field(
        10_000,
        ge=1,
        description="Events written by one group commit at most (a request is never split across commits). "
        "Larger groups cost SQLite less per event (each commit starts with a cold page cache when another "
        "worker wrote last) and hold the write lock longer (docs/operations.md).",
    )
    events_max_wait_seconds: float = Field(
        5.0,
        gt=0,
        description="How long an event request waits for the commit that holds it before 503 "
        "commit_timeout (its events may still be stored: retrying with the same event_ids is safe).",
    )
    log_level: str = "info"
    keep_checkpoints: int = Field(
        5, description="Checkpoints kept on disk by retraining (the promoted one always)."
    )
    fresh_weight: int = Field(
        10,
        ge=1,
        le=100,
        description="In a model user's vector remade from their events since the model's watermark (source "
        "model+recent), how many of their trained positives one new positive event counts as: 1 is the "
        "trainer's own pooling rule; the default 10 was the best of 1-1000 for the pooled tower on "
        "ml-latest-small (docs/benchmarks.md, fresh vectors).",
    )
    negative_types: frozenset[str] = Field(
        frozenset({"dislike", "skip", "hide"}),
        description="Event types that are explicit negative feedback: never positives, fed to the feedback "
        'sampler. JSON list in the environment, e.g. RECSYS_NEGATIVE_TYPES=\'["dislike","skip"]\'.',
    )

    event_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Training weight of a positive (user, item) pair by its event type: the pair weighs the "
        "largest weight among its positive events; types not listed weigh 1; negative types are never "
        "positives whatever their weight. JSON object in the environment, e.g. "
        'RECSYS_EVENT_WEIGHTS=\'{"purchase": 3, "add_to_cart": 2, "like": 2, "share": 2, "rating": 1, '
        '"click": 1, "view": 0.3}\' (RECOMMENDED_EVENT_WEIGHTS). Default {}: unweighted.',
    )

    @field_validator("database_url")
    @classmethod
    def _parseable(cls, url: str | None) -> str | None:
        """Refused when read, with the variable's name, rather than as a traceback at the first connection."""
        if not url:
            return None
        try:
            driver = make_url(url).drivername
        except (ArgumentError, ValueError) as exc:
            raise ValueError(f"not a database URL ({exc}); e.g. postgresql://user@host:5432/db "
                             "or sqlite:////srv/recsys/recsys.db") from None
        if driver not in DRIVERS:
            raise ValueError(f"unsupported database {driver!r}: the service runs on SQLite (sqlite:////srv/recsys/"
                             "recsys.db) or PostgreSQL through psycopg (postgresql://user@host:5432/db)")
        return url

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Accept plain postgres URLs and pin the psycopg 3 driver.
            for prefix in ("postgresql://", "postgres://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{(self.data_dir / 'recsys.db').resolve()}"

    @property
    def checkpoints_path(self) -> Path:
        return self.checkpoint_dir or self.data_dir / "checkpoints"


class SettingsError(ValueError):
    """A ``RECSYS_*`` variable that cannot be read; the message names each one, its value and what is wrong."""


def _explain(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        name, *inner = (str(part) for part in err["loc"])
        where = f"RECSYS_{name.upper()}" + (f" [{'.'.join(inner)}]" if inner else "")
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]  # no "Value error, "
        problems.append(f"{where}={err.get('input')!r}: {msg}")
    return "invalid setting: " + "; ".join(problems)


def _not_json(exc: SourceError) -> str:
    """pydantic-settings names the field of a JSON value it could not parse only in its message."""
    field = re.search(r'field "(\w+)"', str(exc))
    name = f"RECSYS_{field.group(1).upper()}" if field else "a RECSYS_* variable"
    return f"invalid setting: {name}={os.environ.get(name)!r}: not JSON ({exc.__cause__ or exc})"


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once; SettingsError when a variable cannot be read."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
    except SourceError as exc:  # a JSON-valued variable (RECSYS_EVENT_WEIGHTS, …) that does not parse
        raise SettingsError(_not_json(exc)) from None
