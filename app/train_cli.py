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

from trainer.config import (
    CAP_EPOCHS,
    CAP_MAX,
    CAP_STEPS,
    FREE_PART_MIN_MEDIAN,
    LOSSES,
    PATIENCE_EPOCHS,
    PATIENCE_MAX,
    PATIENCE_STEPS,
    PRECISIONS,
    SHARP_MIN_POSITIVES,
    SHARP_TEMPERATURE,
    SOFTEST_TEMPERATURE,
    STRATEGIES,
    TOWERS,
    SamplerConfig,
    TrainConfig,
)

negatives_app = typer.Typer(help="Compare negative-sampling strategies and inspect drawn negatives.",
                            no_args_is_help=True, rich_markup_mode=None)
T, S = TrainConfig(), SamplerConfig()  # the defaults every option below falls back to


def _d(value: object) -> str:
    return f" [default: {value}]"


EventsOpt = Annotated[Path | None, typer.Option("--events", help="Event file (MovieLens u.data/ratings.csv, "
                                                 "CSV, Parquet); default: the database.")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Force the file format (default: detected).")]
StrategyOpt = Annotated[str | None, typer.Option(
    "--strategy", help=f"Negatives: {', '.join(STRATEGIES)}; mixed blends {' + '.join(S.mixed)}." + _d(S.strategy),
    show_default=False)]
MixOpt = Annotated[str | None, typer.Option(
    "--mix", help="The sources --strategy mixed blends, comma-separated (uniform, popularity, in-batch, hard, "
    "feedback)." + _d(",".join(S.mixed)), show_default=False)]
LossOpt = Annotated[str | None, typer.Option(
    "--loss", help="softmax (sampled softmax), nce (binary NS) or bpr." + _d(T.loss), show_default=False)]
TowerOpt = Annotated[str | None, typer.Option(
    "--tower", help="User vectors: pooled (from the user's history items; new events move them without "
    "retraining), free (one trained vector per user), both, or auto (both when the median user has at "
    f"least {FREE_PART_MIN_MEDIAN} training positives, else pooled)." + _d(T.tower), show_default=False)]
BiasOpt = Annotated[bool | None, typer.Option(
    "--item-bias/--no-item-bias", help="Learn an item bias beside the cosine score." + _d(T.item_bias),
    show_default=False)]
DimOpt = Annotated[int | None, typer.Option("--dim", min=2, max=1024, help="Embedding dimension." + _d(T.dim),
                                            show_default=False)]
EpochsOpt = Annotated[int | None, typer.Option(
    "--epochs", min=1, help="Most epochs; training stops earlier when validation stops improving. [default: "
    f"{CAP_EPOCHS}, or as many as make {CAP_STEPS:,} steps when that is more, at most {CAP_MAX}]",
    show_default=False)]
HistoryCapOpt = Annotated[int | None, typer.Option(
    "--history-cap", min=0, help="Pooled tower: at most this many of a user's items per training row "
    "(drawn at random; the service pools them all); 0: the whole history." + _d(T.history_cap), show_default=False)]
TieOpt = Annotated[bool | None, typer.Option(
    "--tie-history/--own-history", help="Pooled tower: pool the item vectors themselves, or a history table "
    "of its own." + _d(T.tie_history), show_default=False)]
MaskKnownOpt = Annotated[bool | None, typer.Option(
    "--mask-known/--no-mask-known", help="Leave out of each row's negatives the items its user already has "
    "(they are positives, not negatives)." + _d(T.mask_known), show_default=False)]
PatienceOpt = Annotated[int | None, typer.Option(
    "--patience", min=1, help="Epochs without a better validation score before training stops. [default: "
    f"{PATIENCE_EPOCHS}, or as many as make {PATIENCE_STEPS} steps when that is more, at most {PATIENCE_MAX}]",
    show_default=False)]
MinDeltaOpt = Annotated[float | None, typer.Option(
    "--min-delta", min=0.0, max=1.0, help="An epoch counts as better only when its validation NDCG@10 beats "
    "the best by this share." + _d(T.min_delta), show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (runs repeat exactly with --threads 1; with more threads they differ in the last bits).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="torch/FAISS threads; with 2 or more, selection and the final fit run side by side, half each." + _d(T.threads),
                                                show_default=False)]
LrOpt = Annotated[float | None, typer.Option("--lr", min=1e-6, help="Adam learning rate." + _d(T.lr),
                                             show_default=False)]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=2, help="Positives per batch." + _d(T.batch_size),
                                              show_default=False)]
NegOpt = Annotated[int | None, typer.Option(
    "--negatives", min=1, help="Shared uniform/popularity negatives per batch." + _d(S.n_negatives),
    show_default=False)]
TempOpt = Annotated[float | None, typer.Option(
    "--temperature", min=1e-3, help="Softmax temperature of the cosine scores. [default: by the log's size: "
    f"{SHARP_TEMPERATURE} from {SHARP_MIN_POSITIVES:,} training positives up, softer below, at most "
    f"{SOFTEST_TEMPERATURE}]",
    show_default=False)]
PrecisionOpt = Annotated[str | None, typer.Option(
    "--logits-precision", help="The shared negatives' logits product: auto (bfloat16 where the CPU or GPU "
    "multiplies it natively, else float32), float32 or bfloat16." + _d(T.logits_precision), show_default=False)]
LogqOpt = Annotated[bool, typer.Option("--logq/--no-logq", help="Apply the logQ correction.")]
ShipOpt = Annotated[str, typer.Option(
    "--ship", help="all: after choosing the epochs on each user's newest 20%, fit every event and ship that "
    "model; tested: ship the model that was tested (it never saw the newest 20%).")]
ProgressOpt = Annotated[bool, typer.Option(
    "--progress/--no-progress", help="Progress bar on a terminal (a line per epoch elsewhere).")]
EventWeightsOpt = Annotated[bool, typer.Option(
    "--event-weights/--no-event-weights",
    help="Weight positives by event type (RECSYS_EVENT_WEIGHTS); --no-event-weights trains unweighted.")]
AlphaOpt = Annotated[float | None, typer.Option(
    "--alpha", min=0.0, max=1.0, help="Popularity exponent (popularity)." + _d(S.alpha), show_default=False)]
PoolOpt = Annotated[int | None, typer.Option("--pool", min=2, help="Hard: top items searched per user." + _d(S.pool),
                                             show_default=False)]
SkipOpt = Annotated[int | None, typer.Option(
    "--skip", min=0, help="Hard: top non-positive ranks skipped." + _d(S.skip), show_default=False)]
RefreshOpt = Annotated[int | None, typer.Option(
    "--refresh-every", min=1, help="Hard: steps between index rebuilds." + _d(S.refresh_every), show_default=False)]
IndexOpt = Annotated[str | None, typer.Option(
    "--index-type", help="Hard: flat, ivf, hnsw or auto (flat up to 20k items)." + _d(S.index_type),
    show_default=False)]
WarmupOpt = Annotated[int | None, typer.Option(
    "--hard-warmup", min=0, help="Hard: epochs on easy negatives first." + _d(T.hard_warmup_epochs),
    show_default=False)]
NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, max=256,
    help="Training processes on this machine (data-parallel ranks under torchrun; see docs/scaling.md).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, or cuda[:N] to train on a GPU.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _writable_dir(path: Path, what: str) -> Path:
    """``path``, made now if it is missing: a folder a command cannot write fails before its work (a
    training run, a report), not after it."""
    import os

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(f"cannot make the {what} {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _fail(f"cannot write to the {what} {path}: permission denied")
    return path


def _check_choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=name)


SAMPLER_OPTIONS = {"strategy": "strategy", "mix": "mixed", "negatives": "n_negatives", "alpha": "alpha", "pool": "pool",
                   "skip": "skip", "refresh_every": "refresh_every", "index_type": "index_type"}


def _config(seed: int, logq: bool, progress: bool, **given: Any) -> TrainConfig:
    """``TrainConfig()`` with what was given on the command line (an option left out is None: the default)."""
    _check_choice("--strategy", given.get("strategy"), STRATEGIES)
    _check_choice("--loss", given.get("loss"), LOSSES)
    _check_choice("--tower", given.get("tower"), TOWERS)
    _check_choice("--logits-precision", given.get("logits_precision"), PRECISIONS)
    _check_choice("--index-type", given.get("index_type"), ("flat", "ivf", "hnsw", "auto"))
    given = {k: v for k, v in given.items() if v is not None}
    if "mix" in given:
        given["mix"] = tuple(x.strip() for x in given["mix"].split(",") if x.strip())
        for source in given["mix"]:
            _check_choice("--mix", source, tuple(x for x in STRATEGIES if x != "mixed"))
        if not given["mix"]:
            raise typer.BadParameter("name at least one source", param_hint="--mix")
    sampler = replace(S, **{SAMPLER_OPTIONS[k]: given.pop(k) for k in list(given) if k in SAMPLER_OPTIONS})
    if sampler.pool <= sampler.skip:
        raise typer.BadParameter(f"--pool ({sampler.pool}) must exceed --skip ({sampler.skip})", param_hint="--pool")
    if "hard_warmup" in given:
        given["hard_warmup_epochs"] = given.pop("hard_warmup")
    if given.get("history_cap") == 0:
        given["history_cap"] = None
    if "item_bias" in given:
        given["item_bias"] = bool(given["item_bias"])
    return replace(T, seed=seed, logq=logq, progress=progress, sampler=sampler, **given)


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
        return read_event_file(events, fmt, event_ids=False), None  # training needs no event ids
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


def _run(frame: Any, cfg: TrainConfig, *, ship: str = "all", init_state: Any = None,
         watermark: int | None = None) -> Any:
    from trainer.pipeline import SHIP, run

    _check_choice("--ship", ship, SHIP)
    try:
        return run(frame, cfg, ship=ship, init_state=init_state, watermark=watermark,
                   negative_types=_negative_types())
    except ValueError as exc:
        raise _fail(str(exc)) from None


def train(
    out: Annotated[Path | None, typer.Option("--out", help="Checkpoint root (default: settings.checkpoints_path).")] = None,
    events: EventsOpt = None,
    fmt: FormatOpt = None,
    strategy: StrategyOpt = None,
    mix: MixOpt = None,
    loss: LossOpt = None,
    tower: TowerOpt = None,
    item_bias: BiasOpt = None,
    dim: DimOpt = None,
    epochs: EpochsOpt = None,
    patience: PatienceOpt = None,
    min_delta: MinDeltaOpt = None,
    history_cap: HistoryCapOpt = None,
    tie_history: TieOpt = None,
    mask_known: MaskKnownOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    negatives: NegOpt = None,
    temperature: TempOpt = None,
    logits_precision: PrecisionOpt = None,
    logq: LogqOpt = True,
    alpha: AlphaOpt = None,
    pool: PoolOpt = None,
    skip: SkipOpt = None,
    refresh_every: RefreshOpt = None,
    index_type: IndexOpt = None,
    hard_warmup: WarmupOpt = None,
    progress: ProgressOpt = True,
    event_weights: EventWeightsOpt = True,
    ship: ShipOpt = "all",
    warm_start: Annotated[Path | None, typer.Option("--warm-start", help="Checkpoint to start from.")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Model version (default: time-based).")] = None,
    nproc: NprocOpt = 1,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a model and write a checkpoint: the epochs are chosen on each user's newest 20% (the held-out
    metrics go into the manifest), then every event is fit for that many epochs and that model ships.

    With --nproc N the command re-runs itself as N ranks under torchrun; rank 0 writes the checkpoint.
    """
    import os

    from trainer import prespawn

    cfg = _config(seed, logq, progress, strategy=strategy, mix=mix, loss=loss, tower=tower, item_bias=item_bias, dim=dim,
                  epochs=epochs, patience=patience, min_delta=min_delta, history_cap=history_cap, tie_history=tie_history, mask_known=mask_known, threads=threads, lr=lr, batch_size=batch_size, negatives=negatives,
                  temperature=temperature, logits_precision=logits_precision, alpha=alpha, pool=pool, skip=skip, refresh_every=refresh_every,
                  index_type=index_type, hard_warmup=hard_warmup)
    cfg = replace(cfg, event_weights=_event_weights(event_weights))
    cfg = replace(cfg, device=device)
    world = max(nproc, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's ranks see WORLD_SIZE
    with prespawn.early(cfg.threads, world, device, final_fit=ship == "all"):
        _train(cfg, out, events, fmt, ship, warm_start, version, nproc, device)


def _train(cfg: TrainConfig, out: Path | None, events: Path | None, fmt: Any, ship: str,
           warm_start: Path | None, version: str | None, nproc: int, device: str) -> None:
    import os
    import sys

    from trainer import distributed as dist

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
            init_state = load_model_state(read_checkpoint(_checkpoint(warm_start)).extra_file("model.pt").read_bytes())
        except CheckpointError as exc:
            raise _fail(str(exc)) from None
    frame, watermark = _load(events, fmt)
    if out is None:
        from app.settings import get_settings

        out = get_settings().checkpoints_path
    out = _writable_dir(out, "checkpoint root")
    result = _run(frame, cfg, ship=ship, init_state=init_state, watermark=watermark)
    if not dist.is_main():  # rank 0 writes the checkpoint and reports
        dist.shutdown()
        # this rank's work is done: skip the interpreter's teardown, where a native thread (gloo's,
        # OpenMP's or numba's) aborted a finished rank about once in 50 two-process runs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    from trainer.checkpoint import CheckpointError
    from trainer.pipeline import save

    try:
        path = save(result, out, version=version)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    h, p = result.held_out, result.baseline
    shipped = "fit on every event" if ship == "all" else "the tested model"
    typer.echo(f"checkpoint {path} ({shipped}, {result.selection.best_epoch} epochs)")
    if h:
        users = len(set(result.data.val_u.tolist()))  # a large catalogue's report is on a sample of them
        sampled = f" on a sample of {h['users']:,} of {users:,} users" if h.get("users", users) < users else ""
        typer.echo(f"held-out NDCG@10 {h['ndcg@10']:.4f} recall@10 {h['recall@10']:.4f}{sampled} "
                   f"(most-popular NDCG@10 {p['ndcg@10']:.4f}); {result.seconds:.1f}s")
    dist.shutdown()


def evaluate_cmd(
    events: Annotated[Path, typer.Option("--events", help="Event file to split, train on and test.")],
    fmt: FormatOpt = None,
    strategy: StrategyOpt = None,
    mix: MixOpt = None,
    loss: LossOpt = None,
    tower: TowerOpt = None,
    item_bias: BiasOpt = None,
    dim: DimOpt = None,
    epochs: EpochsOpt = None,
    patience: PatienceOpt = None,
    min_delta: MinDeltaOpt = None,
    history_cap: HistoryCapOpt = None,
    tie_history: TieOpt = None,
    mask_known: MaskKnownOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    negatives: NegOpt = None,
    temperature: TempOpt = None,
    logits_precision: PrecisionOpt = None,
    logq: LogqOpt = True,
    alpha: AlphaOpt = None,
    pool: PoolOpt = None,
    skip: SkipOpt = None,
    refresh_every: RefreshOpt = None,
    index_type: IndexOpt = None,
    hard_warmup: WarmupOpt = None,
    progress: ProgressOpt = True,
    event_weights: EventWeightsOpt = True,
) -> None:
    """The protocol's test: hold out each user's newest 20%, run `recsys train` on the rest, and print the
    shipped model's test metrics next to most-popular."""
    from trainer import prespawn

    cfg = _config(seed, logq, progress, strategy=strategy, mix=mix, loss=loss, tower=tower, item_bias=item_bias, dim=dim,
                  epochs=epochs, patience=patience, min_delta=min_delta, history_cap=history_cap, tie_history=tie_history, mask_known=mask_known, threads=threads, lr=lr, batch_size=batch_size, negatives=negatives,
                  temperature=temperature, logits_precision=logits_precision, alpha=alpha, pool=pool, skip=skip, refresh_every=refresh_every,
                  index_type=index_type, hard_warmup=hard_warmup)
    cfg = replace(cfg, event_weights=_event_weights(event_weights))
    with prespawn.early(cfg.threads, 1, cfg.device):
        _evaluate(cfg, events, fmt)


def _evaluate(cfg: TrainConfig, events: Path, fmt: Any) -> None:
    from trainer.evaluate import popularity_scores
    from trainer.pipeline import evaluate_run, merged_train, score_held_out
    from trainer.report import metric_table

    frame, _ = _load(events, fmt)
    try:
        result = evaluate_run(frame, cfg, negative_types=_negative_types())
    except ValueError as exc:
        raise _fail(str(exc)) from None
    train = merged_train(result.data)
    popular = score_held_out(train, popularity_scores(train.popularity()), result.data.test_u, result.data.test_i)
    typer.echo(metric_table([(f"{cfg.sampler.strategy}/{cfg.loss}", result.test, result.seconds),
                             ("most-popular", popular, None)]))


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
    _writable_dir(out.parent, "output folder")
    wanted: list[str] = []
    if users is not None:
        try:
            wanted = list(dict.fromkeys(x.strip() for x in Path(users).read_text().splitlines() if x.strip()))
        except OSError as exc:
            raise _fail(f"cannot read --users: {exc}") from None
    settings = get_settings()
    engine = _database() if database else None
    try:
        model = load_served(path, engine, settings.data_dir / "index-cache", settings.top_lists, wait=True,
                            similar=False)  # users' lists only: nothing here asks for similar items
        if all_users:
            wanted = list(dict.fromkeys([*model.ckpt.user_ids, *wanted]))
        recommender = Recommender(engine, settings.negative_types, fresh_weight=settings.fresh_weight)
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
    frame.to_csv(out, index=False)
    cold = int((~frame.drop_duplicates("user_id")["source"].isin(["model", "model+recent"])).sum())
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


@negatives_app.command("compare", short_help="The protocol's test of every strategy on one split.")
def compare(
    events: Annotated[Path, typer.Option("--events", help="Event file.")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (Markdown + PNG).")],
    strategies: Annotated[str, typer.Option("--strategies", help="Comma-separated strategies.")] =
    "uniform,popularity,in-batch,hard,mixed",
    fmt: FormatOpt = None,
    loss: LossOpt = None,
    tower: TowerOpt = None,
    dim: DimOpt = None,
    epochs: EpochsOpt = None,
    patience: PatienceOpt = None,
    min_delta: MinDeltaOpt = None,
    history_cap: HistoryCapOpt = None,
    tie_history: TieOpt = None,
    mask_known: MaskKnownOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    negatives: NegOpt = None,
    temperature: TempOpt = None,
    logits_precision: PrecisionOpt = None,
    logq: LogqOpt = True,
    progress: ProgressOpt = False,
) -> None:
    """Run the protocol's test of every strategy on the same split; write REPORT_DIR/report.md,
    results.json and per-epoch plots of each source's informative and false-negative rates."""
    from trainer.data import build_dataset
    from trainer.evaluate import popularity_scores
    from trainer.pipeline import evaluate_run, merged_train, score_held_out
    from trainer.report import diagnostics_table, metric_table, plot_histories, sources_table

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:
        _check_choice("--strategies", name, STRATEGIES)
    frame, _ = _load(events, fmt)
    _writable_dir(out, "report folder")
    try:
        types = _negative_types()
        data = build_dataset(frame, **({} if types is None else {"negative_types": types}))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    train = merged_train(data)
    baseline = score_held_out(train, popularity_scores(train.popularity()), data.test_u, data.test_i)
    rows, histories, results = [], {}, {}
    for name in names:
        cfg = _config(seed, logq, progress, strategy=name, loss=loss, tower=tower, dim=dim, epochs=epochs,
                      patience=patience, min_delta=min_delta, history_cap=history_cap, tie_history=tie_history, mask_known=mask_known, threads=threads, lr=lr, batch_size=batch_size, negatives=negatives, temperature=temperature, logits_precision=logits_precision)
        typer.echo(f"training {name} ...", err=True)
        r = evaluate_run(data, cfg)
        rows.append((name, r.test, r.seconds))
        histories[name] = r.diagnostics()
        results[name] = {"test": r.test, "seconds": r.seconds, "diagnostics": r.diagnostics()}
    rows.append(("most-popular", baseline, None))
    plots = plot_histories(histories, out)
    text = (f"# Negative-sampling comparison\n\nData: `{events}` ({data.describe()}), seed {seed}, logQ "
            f"{'on' if logq else 'off'}; each strategy is `recsys train` on the train split, tested on the "
            f"protocol's test split.\n\n## Test metrics\n\n{metric_table(rows)}\n\n"
            f"## Sampling diagnostics (last selection epoch)\n\n{diagnostics_table(histories)}\n\n"
            f"## Each source's negatives\n\n{sources_table(histories)}\n\n"
            + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "strategies": results}, indent=2, default=str))
    typer.echo(metric_table(rows))
    typer.echo(f"report: {out / 'report.md'}")


@negatives_app.command("show", short_help="Print the negatives the trainer draws for a user.")
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
    app.command("train", short_help="Train a model and write a checkpoint.")(train)
    app.command("evaluate", short_help="The protocol's test of `recsys train` on a file.")(evaluate_cmd)
    app.command("recommend", short_help="Write the lists the service would serve.")(recommend)
    app.add_typer(negatives_app, name="negatives", short_help="Compare strategies; show the negatives drawn.")
