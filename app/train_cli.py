"""The training commands of `recsys`: train, evaluate, recommend, negatives compare/show.

``register(app)`` attaches them to the main Typer app. Torch, pandas and faiss are imported inside
the command bodies so that ``recsys --help`` and ``recsys serve`` stay fast and torch-free.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

STRATEGY_CHOICES = ("uniform", "popularity", "in-batch", "hard", "feedback", "mixed")
LOSS_CHOICES = ("softmax", "nce", "bpr")

negatives_app = typer.Typer(help="Compare negative-sampling strategies and inspect drawn negatives.",
                            no_args_is_help=True)

EventsOpt = Annotated[Path | None, typer.Option("--events", help="Event file (MovieLens u.data/ratings.csv, "
                                                 "CSV, Parquet); default: the database.")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Force the file format (default: detected).")]
StrategyOpt = Annotated[str, typer.Option("--strategy", help=f"Negatives: {', '.join(STRATEGY_CHOICES)}.")]
LossOpt = Annotated[str, typer.Option("--loss", help="softmax (sampled softmax), nce (binary NS) or bpr.")]
DimOpt = Annotated[int, typer.Option("--dim", min=2, max=1024, help="Embedding dimension.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Maximum epochs (early stopping on validation).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (runs are deterministic).")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="torch/FAISS threads.")]
LrOpt = Annotated[float, typer.Option("--lr", min=1e-6, help="Adam learning rate.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=2, help="Positives per batch.")]
NegOpt = Annotated[int, typer.Option("--negatives", min=1, help="Shared uniform/popularity negatives per batch.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=1e-3, help="Softmax temperature of the cosine scores.")]
LogqOpt = Annotated[bool, typer.Option("--logq/--no-logq", help="Apply the logQ correction.")]
RefitOpt = Annotated[bool, typer.Option("--refit/--no-refit", help="Retrain on train+validation for the chosen epochs.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
EventWeightsOpt = Annotated[bool, typer.Option(
    "--event-weights/--no-event-weights",
    help="Weight positives by event type (RECSYS_EVENT_WEIGHTS); --no-event-weights trains unweighted.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Popularity exponent (popularity).")]
PoolOpt = Annotated[int, typer.Option("--pool", min=2, help="Hard: top items searched per user.")]
SkipOpt = Annotated[int, typer.Option("--skip", min=0, help="Hard: top non-positive ranks skipped.")]
RefreshOpt = Annotated[int, typer.Option("--refresh-every", min=1, help="Hard: steps between index rebuilds.")]
IndexOpt = Annotated[str, typer.Option("--index-type", help="Hard: flat, ivf, hnsw or auto (flat up to 20k items).")]
WarmupOpt = Annotated[int, typer.Option("--hard-warmup", min=0, help="Hard: epochs on easy negatives first.")]
NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, max=256,
    help="Training processes on this machine (DistributedDataParallel under torchrun; see docs/scaling.md).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, or cuda[:N] to train on a GPU.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=name)


def _config(strategy: str, loss: str, dim: int, epochs: int, seed: int, threads: int, lr: float, batch_size: int,
            negatives: int, temperature: float, logq: bool, progress: bool, alpha: float = 0.75, pool: int = 100,
            skip: int = 5, refresh_every: int = 200, index_type: str = "auto", hard_warmup: int = 3) -> Any:
    from trainer.samplers import SamplerConfig
    from trainer.train import TrainConfig

    _check_choice("--strategy", strategy, STRATEGY_CHOICES)
    _check_choice("--loss", loss, LOSS_CHOICES)
    _check_choice("--index-type", index_type, ("flat", "ivf", "hnsw", "auto"))
    if pool <= skip:
        raise typer.BadParameter(f"--pool ({pool}) must exceed --skip ({skip})", param_hint="--pool")
    return TrainConfig(dim=dim, epochs=epochs, seed=seed, threads=threads, lr=lr, batch_size=batch_size,
                       loss=loss, logq=logq, temperature=temperature, progress=progress, hard_warmup_epochs=hard_warmup,
                       sampler=SamplerConfig(strategy=strategy, n_negatives=negatives, alpha=alpha, pool=pool,
                                             skip=skip, refresh_every=refresh_every, index_type=index_type))


def _load(events: Path | None, fmt: str | None) -> tuple[Any, int | None]:
    """Events from a file, or from the database (with its watermark) when no file is given."""
    from app.eventfiles import EventFileError, read_event_file

    if events is None:
        from app.db.engine import SchemaError
        from app.db.events import read_events
        from app.db.migrate import checked_engine

        try:
            engine = checked_engine()  # a schema that is behind is refused, as by every other command
            try:
                frame = read_events(engine)
            finally:
                engine.dispose()
        except SchemaError as exc:
            raise _fail(str(exc)) from None
        except Exception as exc:  # the database layer raises several types; report one line
            raise _fail(f"cannot read events from the database: {exc}") from None
        if frame.empty:
            raise _fail("the database holds no events; import some or pass --events FILE")
        return frame, int(frame["id"].max())
    try:
        return read_event_file(events, fmt), None
    except (OSError, ValueError, EventFileError) as exc:
        raise _fail(str(exc)) from None


def _negative_types() -> frozenset[str] | None:
    """The service's configured explicit-negative event types (RECSYS_NEGATIVE_TYPES), if it has them."""
    from app.settings import get_settings

    return getattr(get_settings(), "negative_types", None)


def _event_weights(enabled: bool) -> dict[str, float] | None:
    """The configured per-event-type weights (RECSYS_EVENT_WEIGHTS), or None when switched off."""
    if not enabled:
        return None
    from app.settings import get_settings

    return dict(getattr(get_settings(), "event_weights", None) or {}) or None


def _run(frame: Any, cfg: Any, refit: bool, init_state: Any = None, watermark: int | None = None,
         final_fit: bool = False) -> Any:
    from trainer.pipeline import run

    try:
        return run(frame, cfg, refit=refit, init_state=init_state, watermark=watermark,
                   negative_types=_negative_types(), final_fit=final_fit)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def train(
    out: Annotated[Path | None, typer.Option("--out", help="Checkpoint root (default: settings.checkpoints_path).")] = None,
    events: EventsOpt = None,
    fmt: FormatOpt = None,
    strategy: StrategyOpt = "mixed",
    loss: LossOpt = "softmax",
    dim: DimOpt = 64,
    epochs: EpochsOpt = 30,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 2,
    lr: LrOpt = 0.005,
    batch_size: BatchOpt = 1024,
    negatives: NegOpt = 512,
    temperature: TempOpt = 0.2,
    logq: LogqOpt = True,
    alpha: AlphaOpt = 0.75,
    pool: PoolOpt = 100,
    skip: SkipOpt = 5,
    refresh_every: RefreshOpt = 200,
    index_type: IndexOpt = "auto",
    hard_warmup: WarmupOpt = 3,
    refit: RefitOpt = True,
    progress: ProgressOpt = True,
    event_weights: EventWeightsOpt = True,
    warm_start: Annotated[Path | None, typer.Option("--warm-start", help="Checkpoint to start from.")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Model version (default: time-based).")] = None,
    final_fit: Annotated[bool, typer.Option(
        "--final-fit/--no-final-fit",
        help="After testing, fit every event (the held-out newest ones too) and ship that model.")] = False,
    nproc: NprocOpt = 1,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a model and write a checkpoint directory (split, early stopping, refit, test metrics).

    With --nproc N the command re-runs itself as N ranks under torchrun; rank 0 writes the checkpoint.
    """
    import sys

    from trainer import distributed as dist

    cfg = _config(strategy, loss, dim, epochs, seed, threads, lr, batch_size, negatives, temperature, logq, progress,
                  alpha, pool, skip, refresh_every, index_type, hard_warmup)
    cfg = replace(cfg, event_weights=_event_weights(event_weights), device=device)
    if nproc > 1 and not dist.in_torchrun():
        raise typer.Exit(dist.launch(nproc, "app.cli", dist.strip_option(sys.argv[1:], "--nproc")))
    try:
        dist.init(device)
    except (RuntimeError, ValueError) as exc:
        raise _fail(f"cannot join the training process group: {exc}") from None
    init_state = None
    if warm_start is not None:
        from trainer.checkpoint import CheckpointError, read_checkpoint
        from trainer.train import load_model_state

        try:
            init_state = load_model_state(read_checkpoint(warm_start).extra_file("model.pt").read_bytes())
        except CheckpointError as exc:
            raise _fail(str(exc)) from None
    frame, watermark = _load(events, fmt)
    result = _run(frame, cfg, refit, init_state, watermark, final_fit)
    if not dist.is_main():  # rank 0 writes the checkpoint and reports
        dist.shutdown()
        return
    from trainer.checkpoint import CheckpointError
    from trainer.pipeline import save

    if out is None:
        from app.settings import get_settings

        out = get_settings().checkpoints_path
    try:
        path = save(result, out, version=version)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    t = result.test
    typer.echo(f"checkpoint {path}" + (" (fit on every event after testing)" if final_fit else ""))
    typer.echo(f"test NDCG@10 {t['ndcg@10']:.4f} recall@10 {t['recall@10']:.4f} "
               f"(most-popular NDCG@10 {result.baseline['ndcg@10']:.4f}); {result.seconds:.1f}s")
    dist.shutdown()


def evaluate_cmd(
    events: Annotated[Path, typer.Option("--events", help="Event file to split, train on and test.")],
    fmt: FormatOpt = None,
    strategy: StrategyOpt = "mixed",
    loss: LossOpt = "softmax",
    dim: DimOpt = 64,
    epochs: EpochsOpt = 30,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 2,
    lr: LrOpt = 0.005,
    batch_size: BatchOpt = 1024,
    negatives: NegOpt = 512,
    temperature: TempOpt = 0.2,
    logq: LogqOpt = True,
    alpha: AlphaOpt = 0.75,
    pool: PoolOpt = 100,
    skip: SkipOpt = 5,
    refresh_every: RefreshOpt = 200,
    index_type: IndexOpt = "auto",
    hard_warmup: WarmupOpt = 3,
    refit: RefitOpt = True,
    progress: ProgressOpt = True,
    event_weights: EventWeightsOpt = True,
) -> None:
    """Split by the protocol, train, and print the test metrics next to most-popular."""
    from trainer.report import metric_table

    cfg = _config(strategy, loss, dim, epochs, seed, threads, lr, batch_size, negatives, temperature, logq, progress,
                  alpha, pool, skip, refresh_every, index_type, hard_warmup)
    cfg = replace(cfg, event_weights=_event_weights(event_weights))
    frame, _ = _load(events, fmt)
    result = _run(frame, cfg, refit)
    typer.echo(metric_table([(f"{strategy}/{loss}", result.test, result.seconds),
                             ("most-popular", result.baseline, None)]))


CheckpointOpt = Annotated[Path, typer.Option(
    "--checkpoint", help="A checkpoint directory, or a directory of them (`recsys train --out DIR`): its newest "
    "valid version.")]


def _checkpoint(path: Path) -> Path:
    from app.serving.checkpoints import resolve_checkpoint
    from trainer.checkpoint import CheckpointError

    try:
        found = resolve_checkpoint(path)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    if found != path.resolve():
        typer.echo(f"checkpoint {found}", err=True)
    return found


def recommend(
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option("--out", help="CSV to write: user_id,item_id,rank,score,source.")],
    users: Annotated[Path | None, typer.Option("--users", help="File with one user id per line.")] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Every user of the model.")] = False,
    k: Annotated[int, typer.Option("--k", min=1, max=10_000, help="Items per user.")] = 10,
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen/--include-seen", help="Drop items the user has.")] = True,
    database: Annotated[bool, typer.Option(
        "--database/--no-database",
        help="Apply what the database knows, as the service does: events since the model was trained, "
        "explicit negatives, hidden items, cold users' events. --no-database: the checkpoint alone.")] = True,
) -> None:
    """Write the lists the service would serve (same ranking, exclusions and fallbacks) for some or all users.

    Users the model does not know get the service's fallback (fold-in of their events, or popular items);
    `source` says which. Nothing is logged to impressions.
    """
    import sys

    import pandas as pd
    from tqdm import tqdm

    from app.serving.holder import load_served
    from app.serving.recommender import Ask, Recommender
    from app.settings import get_settings
    from trainer.checkpoint import CheckpointError

    if users is None and not all_users:
        raise _fail("pass --users FILE or --all")
    path = _checkpoint(checkpoint)
    wanted: list[str] = []
    if users is not None:
        try:
            wanted = list(dict.fromkeys(x.strip() for x in Path(users).read_text().splitlines() if x.strip()))
        except OSError as exc:
            raise _fail(f"cannot read --users: {exc}") from None
    settings = get_settings()
    engine = _database() if database else None
    try:
        model = load_served(path, engine, settings.data_dir / "index-cache", settings.top_lists, wait=True)
        if all_users:
            wanted = list(dict.fromkeys([*model.ckpt.user_ids, *wanted]))
        recommender = Recommender(engine, settings.negative_types)
        rows = []
        for user in tqdm(wanted, unit="user", desc="recommend", disable=None, file=sys.stderr):
            answer = recommender.recommend(model, Ask(user, k, exclude_seen))
            assert answer is not None  # only the event loop's fast path gets None
            rows += [(user, i["item_id"], i["rank"], i["score"], answer.source) for i in answer.items()]
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    finally:
        if engine is not None:
            engine.dispose()
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rank", "score", "source"])
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    cold = int((frame.drop_duplicates("user_id")["source"] != "model").sum())
    typer.echo(f"{len(frame)} recommendations for {len(wanted)} users ({cold} not in the model) -> {out}")


def _database() -> Any:
    """The service's database (RECSYS_DATABASE_URL), refused when its schema is behind."""
    from app.db.engine import SchemaError
    from app.db.migrate import checked_engine

    try:
        return checked_engine()
    except SchemaError as exc:
        raise _fail(f"{exc} (or pass --no-database)") from None
    except Exception as exc:  # the database layer raises several types; report one line
        raise _fail(f"cannot open the database: {exc} (or pass --no-database)") from None


@negatives_app.command("compare")
def compare(
    events: Annotated[Path, typer.Option("--events", help="Event file.")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (Markdown + PNG).")],
    strategies: Annotated[str, typer.Option("--strategies", help="Comma-separated strategies.")] =
    "uniform,popularity,in-batch,hard,mixed",
    fmt: FormatOpt = None,
    loss: LossOpt = "softmax",
    dim: DimOpt = 64,
    epochs: EpochsOpt = 30,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 2,
    lr: LrOpt = 0.005,
    batch_size: BatchOpt = 1024,
    negatives: NegOpt = 512,
    temperature: TempOpt = 0.2,
    logq: LogqOpt = True,
    alpha: AlphaOpt = 0.75,
    pool: PoolOpt = 100,
    skip: SkipOpt = 5,
    refresh_every: RefreshOpt = 200,
    index_type: IndexOpt = "auto",
    hard_warmup: WarmupOpt = 3,
    progress: ProgressOpt = False,
) -> None:
    """Train every strategy on the same split; write REPORT_DIR/report.md, results.json and plots."""
    from trainer.data import build_dataset
    from trainer.report import diagnostics_table, metric_table, plot_histories

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:
        _check_choice("--strategies", name, STRATEGY_CHOICES)
    frame, _ = _load(events, fmt)
    try:
        types = _negative_types()
        data = build_dataset(frame, **({} if types is None else {"negative_types": types}))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    rows, histories, results = [], {}, {}
    baseline = None
    for name in names:
        cfg = _config(name, loss, dim, epochs, seed, threads, lr, batch_size, negatives, temperature, logq, progress,
                  alpha, pool, skip, refresh_every, index_type, hard_warmup)
        typer.echo(f"training {name} ...", err=True)
        r = _run(data, cfg, refit=True)
        rows.append((name, r.test, r.seconds))
        histories[name] = r.diagnostics()
        results[name] = {"test": r.test, "seconds": r.seconds, "diagnostics": r.diagnostics()}
        baseline = r.baseline
    rows.append(("most-popular", baseline or {}, None))
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_histories(histories, out)
    text = (f"# Negative-sampling comparison\n\nData: `{events}` ({data.describe()}), loss {loss}, "
            f"logQ {'on' if logq else 'off'}, seed {seed}.\n\n## Test metrics\n\n{metric_table(rows)}\n\n"
            f"## Sampling diagnostics (last selection epoch)\n\n{diagnostics_table(histories)}\n\n"
            + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "strategies": results}, indent=2, default=str))
    typer.echo(metric_table(rows))
    typer.echo(f"report: {out / 'report.md'}")


@negatives_app.command("show")
def show(
    checkpoint: CheckpointOpt,
    user: Annotated[str, typer.Option("--user", help="External user id.")],
    strategy: Annotated[str, typer.Option(
        "--strategy", help="trained (what the checkpoint was trained with, blended as in training), mixed "
        "(its recorded blend), or one source alone: uniform, popularity, in-batch, hard, feedback.")] = "trained",
    n: Annotated[int, typer.Option("--n", min=1, max=10_000, help="Negatives to show, split between the "
                                   "sources in training's proportions.")] = 10,
    seed: SeedOpt = 0,
    feedback_items: Annotated[str | None, typer.Option("--feedback-items", help="Comma-separated item ids "
                                                       "the user rejected (default: the checkpoint's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the negatives the trainer's sampler, as configured for the checkpoint, draws for one user."""
    from trainer.checkpoint import CheckpointError, read_checkpoint
    from trainer.inspect_negatives import CHOICES, draw_negatives

    _check_choice("--strategy", strategy, CHOICES)
    path = _checkpoint(checkpoint)
    try:
        ckpt = read_checkpoint(path)
        fb = [x.strip() for x in feedback_items.split(",")] if feedback_items else None
        result = draw_negatives(ckpt, user, strategy, n, feedback_items=fb, seed=seed)
    except (CheckpointError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except KeyError as exc:
        raise _fail(str(exc.args[0])) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"user {user}, strategy {result['strategy']} ({strategy}), model {result['model_version']}")
    typer.echo(f"{'item':>12} {'source':>10} {'q':>10} {'score':>8} {'rank':>7} {'pop':>6} known")
    for x in result["negatives"]:
        typer.echo(f"{x['item_id']:>12} {x['source']:>10} {x['q']:>10.3g} {x['score']:>8.3f} {x['rank']:>7} "
                   f"{x['popularity']:>6} {'yes' if x['known_positive'] else ''}")
    typer.echo(json.dumps(result["summary"]))


def register(app: typer.Typer) -> None:
    """Attach train, evaluate, recommend and the negatives group to the main CLI."""
    app.command("train")(train)
    app.command("evaluate")(evaluate_cmd)
    app.command("recommend")(recommend)
    app.add_typer(negatives_app, name="negatives")
