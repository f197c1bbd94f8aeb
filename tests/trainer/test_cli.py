"""The trainer's commands end to end on a small generated file, through a Typer app they register into."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from app.train_cli import register

FAST = ["--epochs", "2", "--batch-size", "256", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


@pytest.fixture(scope="module")
def checkpoint(app: typer.Typer, small_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpts")
    r = CliRunner().invoke(app, ["train", "--events", str(small_file), "--out", str(out), "--version", "v1", *FAST])
    assert r.exit_code == 0, r.output
    assert "held-out NDCG@10" in r.output and "fit on every event" in r.output
    return out / "v1"


def test_train_writes_a_checkpoint(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["config"]["sampler"]["strategy"] == "mixed" and manifest["n_users"] == 300
    assert manifest["config"]["mask_known"] is True  # the default: a user's own items are never negatives


def test_the_default_ships_a_model_fit_on_every_event(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["config"]["shipped"] == "all"
    phases = [d["phase"] for d in manifest["diagnostics"]]
    assert phases.count("all") == manifest["metrics"]["best_epoch"]
    data = manifest["metrics"]["data"]  # the final fit trained on the held-out newest events too
    last = manifest["diagnostics"][-1]
    trained = last["events_per_s"] * last["train_seconds"]
    assert data["validation"] > 0 and abs(trained - (data["train"] + data["validation"])) < 0.02 * trained
    assert manifest["metrics"]["held_out"]["ndcg@10"] > 0  # held-out metrics of the selection run are kept
    # a false-negative rate needs validation positives: the selection run has one, the final fit none (not 0)
    assert all(("false_negative_rate" in d) == (d["phase"] == "selection") for d in manifest["diagnostics"])


def test_mix_chooses_the_sources_of_the_mixed_strategy(app: typer.Typer, small_file: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--events", str(small_file), "--out", str(tmp_path), "--version", "m",
                                 "--mix", "in-batch,uniform,hard", "--hard-warmup", "0", *FAST])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["config"]["sampler"]["mixed"] == ["in-batch", "uniform", "hard"]
    assert set(manifest["diagnostics"][0]["sources"]) == {"in-batch", "uniform", "hard"}


def test_ship_tested_keeps_the_selection_model(app: typer.Typer, small_file: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--events", str(small_file), "--out", str(tmp_path), "--version", "t",
                                 "--ship", "tested", *FAST])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["config"]["shipped"] == "tested"
    assert {d["phase"] for d in manifest["diagnostics"]} == {"selection"}


def test_a_large_catalogues_report_is_on_a_fixed_sample_of_users(app: typer.Typer, small_file: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REPORT_CELLS scores (users × items), the held-out report and its baseline score the same
    sample of users, and the command says so."""
    import trainer.evaluate

    monkeypatch.setattr(trainer.evaluate, "REPORT_CELLS", 1)
    monkeypatch.setattr(trainer.evaluate, "REPORT_MIN_USERS", 40)
    r = CliRunner().invoke(app, ["train", "--events", str(small_file), "--out", str(tmp_path), "--version", "s",
                                 *FAST])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "s" / "manifest.json").read_text())["metrics"]
    assert metrics["held_out"]["users"] == metrics["most_popular"]["users"] == 40
    assert "on a sample of 40 of " in r.output


def test_no_mask_known_trains_with_the_users_items_as_negatives(app: typer.Typer, small_file: Path,
                                                                tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--events", str(small_file), "--out", str(tmp_path), "--version", "n",
                                 "--no-mask-known", *FAST])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "n" / "manifest.json").read_text())["config"]["mask_known"] is False


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """RECSYS_DATA_DIR for one test (where `recommend` caches the top lists it ranks with)."""
    from app.settings import get_settings

    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_recommend_all_and_some_users(app: typer.Typer, checkpoint: Path, data_dir: Path) -> None:
    """From the checkpoint alone (--no-database): its seen items and explicit negatives are left out, users it
    does not know get the popular items. The service's lists: tests/api/test_parity.py."""
    tmp_path = data_dir
    out = tmp_path / "recs.csv"
    root = checkpoint.parent  # a directory of versions, as `train --out` writes it, is accepted too
    for given in (checkpoint, root):
        r = CliRunner().invoke(app, ["recommend", "--checkpoint", str(given), "--all", "--k", "5", "--out", str(out),
                                     "--no-database"])
        assert r.exit_code == 0, r.output
    recs = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "source"] and len(recs) == 300 * 5
    assert set(recs.source) == {"model"}
    assert (recs.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    # the users' top lists were built (and cached); the items' similar lists, which nothing here reads, were not
    assert len(list((tmp_path / "index-cache").glob("*.top-rows.npy"))) == 1
    from trainer.checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    for u, i in zip(recs["user_id"], recs["item_id"], strict=True):
        assert ckpt.seen[ckpt.user_row[u], ckpt.item_row[i]] == 0 and ckpt.feedback[ckpt.user_row[u], ckpt.item_row[i]] == 0
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\nghost\n")
    r = CliRunner().invoke(app, ["recommend", "--checkpoint", str(checkpoint), "--users", str(users), "--k", "3",
                                 "--out", str(out), "--no-database"])
    assert r.exit_code == 0, r.output
    recs = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    assert recs.groupby("user_id")["source"].first().to_dict() == {"u1": "model", "u2": "model", "ghost": "popular"}
    assert len(recs) == 9


def test_evaluate_prints_a_table_with_the_baseline(app: typer.Typer, small_file: Path) -> None:
    r = CliRunner().invoke(app, ["evaluate", "--events", str(small_file), "--strategy", "popularity", *FAST])
    assert r.exit_code == 0, r.output
    assert "| popularity/softmax |" in r.output and "| most-popular |" in r.output


def test_negatives_show(app: typer.Typer, checkpoint: Path) -> None:
    """The trainer's sampler as the checkpoint records it (mixed: in-batch + uniform), or one source alone."""
    for strategy, sources in (("trained", {"in-batch", "uniform"}), ("hard", {"hard"})):
        r = CliRunner().invoke(app, ["negatives", "show", "--checkpoint", str(checkpoint.parent), "--user", "u1",
                                     "--strategy", strategy, "--n", "5", "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output[r.output.index("{"):])
        assert len(out["negatives"]) == 5 and {n["source"] for n in out["negatives"]} == sources


def test_negatives_compare_writes_report_and_plots(app: typer.Typer, small_file: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["negatives", "compare", "--events", str(small_file), "--out", str(tmp_path),
                                 "--strategies", "uniform,in-batch", *FAST])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "report.md").read_text()
    assert "| uniform |" in text and "| in-batch |" in text and "| most-popular |" in text
    assert "| in-batch | in-batch |" in text and "| uniform | uniform |" in text  # each source's rates
    for png in ("val_ndcg.png", "neg_score.png", "informative_rate.png", "source_informative_rate.png",
                "source_false_negative_rate.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads((tmp_path / "results.json").read_text())["strategies"]) == {"uniform", "in-batch"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--events", "/no/such/file.csv", "--out", "/tmp/x"], "no such file"),
        (["train", "--events", "{ckpt}", "--out", "/tmp/x"], "a directory; give the event file inside it"),
        (["train", "--events", "{file}", "--out", "/tmp/x", "--strategy", "nope"], "nope"),
        (["train", "--events", "{file}", "--out", "/tmp/x", "--loss", "hinge"], "hinge"),
        (["train", "--events", "{file}", "--out", "/tmp/x", "--mix", "in-batch,nope"], "nope"),
        (["negatives", "show", "--checkpoint", "{ckpt}", "--user", "ghost"], "unknown user"),
        (["negatives", "show", "--checkpoint", "/no/such/dir", "--user", "u1"], "not a checkpoint"),
        (["recommend", "--checkpoint", "{ckpt}", "--out", "/tmp/x.csv"], "--users FILE or --all"),
        # a folder that cannot be made fails before the work, not after it
        (["train", "--events", "{file}", "--out", "{file}/ckpts"], "cannot make the checkpoint root"),
        (["recommend", "--checkpoint", "{ckpt}", "--all", "--out", "{file}/lists.csv"], "cannot make the output folder"),
        (["negatives", "compare", "--events", "{file}", "--out", "{file}/report"], "cannot make the report folder"),
    ],
)
def test_bad_input_exits_2_with_a_message(app: typer.Typer, small_file: Path, checkpoint: Path,
                                          args: list[str], message: str) -> None:
    args = [a.format(file=small_file, ckpt=checkpoint) for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback


def test_train_from_the_database_records_the_watermark(app: typer.Typer, small_events: pd.DataFrame,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.db.engine import make_engine
    from app.db.events import insert_events
    from app.db.migrate import upgrade
    from app.settings import get_settings

    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        url = get_settings().sqlalchemy_url
        upgrade(url)
        engine = make_engine(url)
        with engine.begin() as conn:
            insert_events(conn, small_events.iloc[:3000])
        engine.dispose()
        r = CliRunner().invoke(app, ["train", "--version", "db1", *FAST])  # no --events, no --out: settings
        assert r.exit_code == 0, r.output
        manifest = json.loads((tmp_path / "checkpoints" / "db1" / "manifest.json").read_text())
        assert manifest["watermark"] == 3000 and manifest["metrics"]["data"]["train"] > 0
    finally:
        get_settings.cache_clear()


def test_progress_in_a_log_file_is_a_line_per_epoch(small_file: Path, tmp_path: Path) -> None:
    """Redirected output (a cron job, a container log) gets no bar redraws: one line per epoch and stage."""
    import subprocess
    import sys

    log = tmp_path / "train.log"
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "app.cli", "train", "--events", str(small_file), "--out",
                               str(tmp_path / "ck"), "--epochs", "3", "--batch-size", "256", "--threads", "1"],
                              stdout=f, stderr=subprocess.STDOUT, check=False)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and len(text.splitlines()) <= 2 * 3 + 4, text
    assert text.count("epoch ") >= 2 and "held-out NDCG@10" in text
    assert text.startswith("training on ") and ", batch 256, " in text  # what the run trains, first


def test_the_command_keeps_its_status_and_output_without_the_interpreter_teardown(tmp_path: Path) -> None:
    """`recsys` ends with os._exit once a command is done (app/cli.py: main): the status and every line
    written must survive that."""
    import subprocess
    import sys

    def recsys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, check=False)

    missing = recsys("train", "--events", str(tmp_path / "none.csv"), "--out", str(tmp_path / "ck"))
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
    unknown = recsys("no-such-command")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr
    helped = recsys("train", "--help")
    assert helped.returncode == 0 and "--events" in helped.stdout and "--ship" in helped.stdout


def test_a_crash_in_native_code_names_where_it_happened() -> None:
    """A segfault under `recsys` (app/cli.py: main) leaves the Python stack of the code that made it."""
    import subprocess
    import sys

    crash = ("import ctypes, sys\nfrom app import cli\n"
             "@cli.app.command('crash')\ndef deliberate_crash() -> None:\n    ctypes.string_at(0)\n"
             "sys.argv = ['recsys', 'crash']\ncli.main()\n")
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode != 0
    assert "Fatal Python error: Segmentation fault" in done.stderr and "deliberate_crash" in done.stderr, done.stderr


def test_the_shipped_model_has_learned_a_taste_planted_in_the_newest_events(
    app: typer.Typer, small_events: pd.DataFrame, tmp_path: Path,
) -> None:
    """Users of one cluster whose newest events are all on another cluster's items: the model `recsys train`
    ships recommends that cluster to them (a model that never saw the newest 20% could not)."""
    import numpy as np

    user_cluster, item_cluster = small_events.attrs["user_cluster"], small_events.attrs["item_cluster"]
    group = [f"u{u}" for u in np.flatnonzero(user_cluster == 0)[:20]]
    target = [f"i{i}" for i in np.flatnonzero(item_cluster == 1)]
    rng = np.random.default_rng(0)
    t_end = small_events["timestamp"].max()
    planted = pd.DataFrame([
        {"event_id": f"new-{u}-{it}", "user_id": u, "item_id": it, "type": "click", "value": None,
         "timestamp": t_end + 1 + k}
        for u in group for k, it in enumerate(rng.choice(target, 8, replace=False))
    ])

    def share(events: pd.DataFrame, name: str) -> float:
        path = tmp_path / f"{name}.csv"
        events.to_csv(path, index=False)
        out, recs = tmp_path / name, tmp_path / f"{name}-recs.csv"
        r = CliRunner().invoke(app, ["train", "--events", str(path), "--out", str(out), *FAST])
        assert r.exit_code == 0, r.output
        users = tmp_path / "users.txt"
        users.write_text("\n".join(group) + "\n")
        r = CliRunner().invoke(app, ["recommend", "--checkpoint", str(out), "--users", str(users), "--k", "10",
                                     "--no-database", "--out", str(recs)])
        assert r.exit_code == 0, r.output
        lists = pd.read_csv(recs, dtype=str)
        return float(lists["item_id"].isin(target).mean())

    before = share(small_events, "before")
    after = share(pd.concat([small_events, planted[small_events.columns.intersection(planted.columns)]]), "after")
    assert before < 0.15 and after > 0.3, (before, after)
