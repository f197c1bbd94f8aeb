"""The `recsys` command: one entry point for the database, data, training and serving.

Heavy imports (torch, faiss, pandas) happen inside the commands, so `recsys --help`
and `recsys serve` start fast.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import time
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from sqlalchemy.exc import SQLAlchemyError

from app.db.engine import unavailable
from app.settings import SettingsError, get_settings

if TYPE_CHECKING:
    from trainer.config import TrainConfig

app = typer.Typer(
    name="recsys",
    help="A recommendation service whose edge is negative sampling. "
    "Configuration comes from RECSYS_* environment variables (see README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # plain help: rich's boxed panels squeezed every description into a narrow column on an 80-column
    # terminal and filled logs with box-drawing characters
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(db_app, name="db")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _engine():  # noqa: ANN202 - SQLAlchemy Engine, imported lazily
    from app.db.engine import SchemaError
    from app.db.migrate import checked_engine

    try:
        return checked_engine()
    except SchemaError as exc:
        raise fail(str(exc)) from None


@db_app.command("upgrade", short_help="Create or migrate the schema to the newest revision.")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Create or migrate the schema to the newest revision (safe to run repeatedly)."""
    from app.db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.sqlalchemy_url, revision)
    typer.echo(f"database at revision {revision}: {_safe_url(settings.sqlalchemy_url)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision ('base' drops everything).")] = "-1",
) -> None:
    """Step the schema back (default: one revision)."""
    from app.db.migrate import downgrade

    downgrade(get_settings().sqlalchemy_url, revision)
    typer.echo(f"database downgraded to {revision}")


@db_app.command("current", short_help="Show the database's schema revision and the newest.")
def db_current() -> None:
    """Show the schema revision of the database and the one this code needs."""
    from app.db.engine import make_engine
    from app.db.migrate import current_revision, head_revision

    engine = make_engine()
    current, head = current_revision(engine), head_revision()
    typer.echo(
        f"current: {current or '(empty)'}  head: {head}  {'up to date' if current == head else 'behind'}"
    )


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class FileFormat(StrEnum):
    movielens_100k = "movielens-100k"
    movielens_csv = "movielens-csv"
    csv = "csv"
    parquet = "parquet"


@app.command("import", short_help="Load interactions into the database, all or nothing.")
def import_events(
    path: Annotated[Path, typer.Argument(help="Interaction file: u.data, ratings.csv, CSV or Parquet.")],
    format: Annotated[
        FileFormat | None,
        typer.Option("--format", "-f", help="File format; guessed from the file when omitted."),
    ] = None,
) -> None:
    """Load interactions into the database, all or nothing; re-importing a file adds nothing.

    Generic CSV/Parquet columns: user_id,item_id[,timestamp,type,value,event_id]; timestamp is epoch
    seconds or ISO 8601 text (no offset: UTC).
    """
    from tqdm import tqdm

    from app.db.events import analyze_after_import, count_events, insert_events
    from app.eventfiles import EventFileError, read_event_file

    engine = _engine()
    start = time.perf_counter()
    try:
        frame = read_event_file(path, format.value if format else None)
    except EventFileError as exc:
        raise fail(f"{exc} — nothing was imported") from None
    with (
        tqdm(total=len(frame), unit="ev", desc="import", disable=None, file=sys.stderr) as bar,
        engine.begin() as conn,
    ):
        inserted = insert_events(conn, frame, progress=bar.update)
        if inserted:
            analyze_after_import(conn)
        total = count_events(conn)
    seconds = time.perf_counter() - start
    typer.echo(
        f"read {len(frame):,} events ({frame['user_id'].nunique():,} users, {frame['item_id'].nunique():,} items) "
        f"from {path}; {inserted:,} new, {len(frame) - inserted:,} already present; "
        f"{total:,} events in the database; {seconds:.1f} s"
    )


@app.command("export", short_help="Write all events out as CSV or Parquet.")
def export_events(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .csv, .csv.gz or .parquet.")],
) -> None:
    """Write all events out as CSV or Parquet (the trainer's input away from the database)."""
    from app.db.events import read_events
    from app.eventfiles import EventFileError, write_event_file

    engine = _engine()
    frame = read_events(engine)
    try:
        write_event_file(frame, out)
    except EventFileError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {len(frame):,} events to {out}")


@app.command("synth", short_help="Generate a deterministic synthetic event log.")
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .csv, .csv.gz or .parquet.")],
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 1000,
    items: Annotated[int, typer.Option(min=2, help="Number of items.")] = 500,
    events: Annotated[int, typer.Option(min=1, help="Number of events.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same file.")] = 0,
    clusters: Annotated[int, typer.Option(min=0, help="Taste clusters (0: from the catalogue size).")] = 0,
) -> None:
    """Generate a deterministic synthetic log: Zipf item popularity, log-normal activity, taste clusters."""
    from app.eventfiles import EventFileError, write_event_file
    from trainer.synth import SynthSpec, generate

    start = time.perf_counter()
    frame = generate(SynthSpec(users=users, items=items, events=events, seed=seed, clusters=clusters))
    try:
        write_event_file(frame, out)
    except EventFileError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {len(frame):,} events to {out} in {time.perf_counter() - start:.1f} s")


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (RECSYS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (RECSYS_PORT).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes (RECSYS_WORKERS).")] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Serve this checkpoint instead of the promoted model: a version directory, or a directory "
            "of versions (`recsys train --out DIR`), whose newest valid one is served."
        ),
    ] = None,
) -> None:
    """Start the HTTP service (uvicorn)."""
    from app.api.server import run

    settings = get_settings()
    _engine().dispose()  # refuse a stale schema before starting workers
    if checkpoint is not None:  # a checkpoint that cannot be served stops here, not in a never-ready worker
        from app.serving.checkpoints import resolve_checkpoint
        from app.serving.model import open_checkpoint
        from trainer.checkpoint import CheckpointError

        try:
            checkpoint = resolve_checkpoint(checkpoint)
            open_checkpoint(checkpoint)
        except CheckpointError as exc:
            raise fail(f"cannot serve --checkpoint {checkpoint}: {exc}") from None
        typer.echo(f"serving checkpoint {checkpoint}", err=True)
    run(
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.workers,
        checkpoint=checkpoint,
        log_level=settings.log_level,
    )


models_app = typer.Typer(help="The model registry: list, promote, roll back.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(models_app, name="models")


@models_app.command("list", short_help="Registered model versions, newest first.")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Registered model versions, newest first, with status and the gate's decision."""
    import json

    from app.db import registry

    engine = _engine()
    with engine.connect() as conn:
        versions = registry.list_versions(conn)
    if as_json:
        typer.echo(json.dumps(versions, indent=2, default=str))
        return
    if not versions:
        typer.echo("no model versions registered yet (run `recsys retrain`)")
        return
    typer.echo(f"{'version':<28} {'status':<10} {'ndcg@10':>8} {'watermark':>10}  on disk  gate")
    for v in versions:
        metrics = v["metrics"] or {}
        ndcg = (metrics.get("held_out") or metrics.get("test") or {}).get("ndcg@10")
        gate = metrics.get("gate", {}).get("reason", "")
        typer.echo(
            f"{v['version']:<28} {v['status']:<10} {'' if ndcg is None else f'{ndcg:.4f}':>8} "
            f"{v['watermark'] if v['watermark'] is not None else '':>10}  "
            f"{'yes' if Path(v['path']).is_dir() else 'no':<7}  {gate}"
        )


def _promote(version: str) -> None:
    from app.db import registry
    from trainer.checkpoint import CheckpointError, read_manifest, verify_files

    engine = _engine()
    with engine.begin() as conn:
        row = registry.get_version(conn, version)
        if row is None:
            raise fail(f"unknown model version {version!r} (see `recsys models list`)")
        try:
            verify_files(Path(row["path"]), read_manifest(row["path"]))
        except CheckpointError as exc:
            raise fail(f"refusing to promote {version}: {exc}") from None
        registry.promote(conn, version)
    typer.echo(
        f"promoted {version}; running services switch to it at their next poll or on POST /admin/reload"
    )


@models_app.command("promote")
def models_promote(version: Annotated[str, typer.Argument(help="The version to serve.")]) -> None:
    """Serve this version (its checkpoint is verified first)."""
    _promote(version)


@models_app.command("rollback", short_help="Serve the version promoted before the current one.")
def models_rollback() -> None:
    """Go back to the version promoted before the current one; the current one is marked rejected."""
    from app.db import registry
    from trainer.checkpoint import CheckpointError, read_manifest, verify_files

    engine = _engine()
    try:
        with engine.begin() as conn:  # one transaction: the registry changes whole or not at all
            current, previous = registry.rollback_plan(conn)
            target = registry.get_version(conn, previous)
            assert target is not None
            try:
                verify_files(Path(target["path"]), read_manifest(target["path"]))
            except CheckpointError as exc:
                raise fail(f"refusing to roll back to {previous}: {exc}") from None
            registry.rollback(conn, to=previous)
    except registry.RegistryError as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"rolled back from {current} (now rejected) to {previous}; running services switch at their next "
        "poll or on POST /admin/reload"
    )


@app.command("retrain", short_help="Train on the newest events; promote if not worse.")
def retrain_cmd(
    strategy: Annotated[
        str | None,
        typer.Option(help="Negative sampling strategy (default: the trainer's, see `recsys train --help`)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Maximum epochs (early stopping on validation).")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(min=1, help="Epochs without a better validation score before training stops.")
    ] = None,
    lr: Annotated[float | None, typer.Option(min=1e-7, help="Adam learning rate.")] = None,
    dim: Annotated[int | None, typer.Option(min=2, max=1024, help="Embedding dimension.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch/FAISS threads; with 2 or more, selection and the final fit run side by side, half each.")] = None,
    warm_start: Annotated[
        bool, typer.Option("--warm-start/--from-scratch", help="Start from the promoted model's embeddings.")
    ] = True,
    tolerance: Annotated[
        float,
        typer.Option(min=0.0, help="How much worse (absolute, on --metric) a candidate may be and ship."),
    ] = 0.005,
    metric: Annotated[
        str, typer.Option(help="Gate metric: ndcg@10, recall@10, hitrate@10, ndcg@20, …")
    ] = "ndcg@10",
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the gate says worse; retrain with no new events.")
    ] = False,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Checkpoints kept on disk (RECSYS_KEEP_CHECKPOINTS).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Batch retraining: read events up to a new watermark, train, gate against the promoted model, promote.

    Exit codes: 0 promoted, rejected or nothing to do; 1 failure (the promoted model is untouched);
    75 another run holds the lock.
    """
    from trainer import prespawn
    from trainer.config import TrainConfig

    # Only what was given on the command line overrides the trainer's defaults.
    given = {"dim": dim, "epochs": epochs, "patience": patience, "lr": lr, "seed": seed, "threads": threads}
    cfg = replace(TrainConfig(), progress=progress, **{k: v for k, v in given.items() if v is not None})
    if strategy is not None:
        cfg = replace(cfg, sampler=replace(cfg.sampler, strategy=strategy))
    with prespawn.early(cfg.threads, 1, cfg.device):  # a job with nothing to do stops the process at once
        _retrain(cfg, warm_start, tolerance, metric, force, keep)


def _retrain(cfg: TrainConfig, warm_start: bool, tolerance: float, metric: str, force: bool,
             keep: int | None) -> None:
    from app.db.engine import SchemaError
    from app.db.lock import LockHeld
    from app.jobs.retrain import RetrainError, RetrainOptions, retrain

    settings = get_settings()
    try:
        options = RetrainOptions(
            config=cfg,
            warm_start=warm_start,
            metric=metric,
            tolerance=tolerance,
            force=force,
            keep=keep or settings.keep_checkpoints,
        )
        outcome = retrain(settings, options, log=typer.echo)
    except LockHeld as exc:
        raise fail(f"{exc}; not starting a second run", code=75) from None
    except (SchemaError, RetrainError, ValueError) as exc:
        raise fail(f"{exc}; the promoted model is untouched") from None
    if outcome.status == "skipped":
        typer.echo(f"nothing to do: {outcome.reason}")
    else:
        typer.echo(f"{outcome.status} {outcome.version}: {outcome.reason}")


DEMO_CURLS = """
Try it (admin token for this demo: {token}):
  curl -s 'http://{host}:{port}/v1/users/u1/recommendations?k=5' | python3 -m json.tool
  curl -s 'http://{host}:{port}/v1/items/i3/similar?k=5' | python3 -m json.tool
  curl -s -X POST http://{host}:{port}/v1/events -H 'content-type: application/json' \\
       -d '{{"event_id": "demo-1", "user_id": "u1", "item_id": "i42", "type": "like"}}'
  curl -s -H 'Authorization: Bearer {token}' \\
       'http://{host}:{port}/admin/users/u1/negatives?strategy=mixed&n=10' | python3 -m json.tool
  open http://{host}:{port}/docs for the API reference
"""


@app.command("demo", short_help="Synthetic data to a running service, in one command.")
def demo(
    users: Annotated[int, typer.Option(min=10, help="Synthetic users.")] = 2000,
    items: Annotated[int, typer.Option(min=10, help="Synthetic items.")] = 1000,
    events: Annotated[int, typer.Option(min=100, help="Synthetic events.")] = 100_000,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Stop after training.")] = False,
) -> None:
    """From nothing to a running service: synthetic data → SQLite → trained model → HTTP on 127.0.0.1.

    Each step runs the real `recsys` subcommand and prints it, so you can repeat any of them.
    """
    import os
    import subprocess

    settings = get_settings()
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    log = data / "demo-events.csv"
    token = settings.admin_token or "demo-token"
    env = {**os.environ, "RECSYS_ADMIN_TOKEN": token}

    def step(*args: str) -> None:
        typer.secho("$ recsys " + " ".join(args), fg=typer.colors.CYAN)
        done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, check=False)
        if done.returncode:
            raise fail(f"`recsys {' '.join(args)}` failed (exit {done.returncode})")

    seed_args = ("--users", str(users), "--items", str(items), "--events", str(events), "--seed", "0")
    step("synth", *seed_args, "--out", str(log))
    step("db", "upgrade")
    step("import", str(log))
    step("train", "--out", str(settings.checkpoints_path))
    if no_serve:
        return
    typer.echo(DEMO_CURLS.format(host="127.0.0.1", port=port, token=token))
    os.environ["RECSYS_ADMIN_TOKEN"] = token
    get_settings.cache_clear()
    serve(host="127.0.0.1", port=port, workers=1, checkpoint=None)


from app.train_cli import register  # noqa: E402 - train, evaluate, recommend, negatives

register(app)


def main() -> None:
    """The `recsys` command. A finished command exits without the interpreter's teardown: with torch, numba
    and FAISS loaded, that teardown spends 0.6-0.9 s freeing what the exit frees anyway (docs/benchmarks.md).
    Every command has synced what it wrote before it returns; output is flushed and logging shut down here.
    A crash in native code (torch, gloo, FAISS, numba) prints every thread's Python stack to stderr first.
    """
    faulthandler.enable()
    try:
        app()  # standalone mode: ends in SystemExit with the command's status
    except SystemExit as exc:
        code = exc.code
    except SettingsError as exc:  # a RECSYS_* variable: say which, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except SQLAlchemyError as exc:
        if not unavailable(exc):
            raise  # a bug: its traceback says where
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"error: the database is unavailable ({reason}); check RECSYS_DATABASE_URL and the server",
              file=sys.stderr)
        code = 1
    except BrokenPipeError:  # `recsys … | head`
        code = 120
    except OSError as exc:  # a folder the command cannot make, a file it cannot write: the message names it
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    else:
        code = 0
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`recsys … | head`): Python's own exit says 120
            code = code or 120
    os._exit(code or 0)


if __name__ == "__main__":
    main()
