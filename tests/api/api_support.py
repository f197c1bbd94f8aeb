"""Test plumbing for the HTTP service: databases with events, checkpoints, and real uvicorn servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from scipy import sparse

from app.db import registry
from app.db.engine import make_engine
from app.db.events import insert_events, max_event_id, read_events
from app.db.migrate import upgrade
from trainer.checkpoint import read_manifest, write_checkpoint
from trainer.synth import SynthSpec, generate

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token"
SPEC = SynthSpec(users=300, items=400, events=9000, seed=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def synthetic() -> pd.DataFrame:
    return generate(SPEC)


def cluster_checkpoint(
    root: Path,
    frame: pd.DataFrame,
    version: str,
    *,
    watermark: int | None,
    seed: int = 0,
    feedback: dict[str, list[str]] | None = None,
) -> Path:
    """A checkpoint whose embeddings are the synthetic log's planted clusters (one-hot) plus noise."""
    rng = np.random.default_rng(seed)
    users = sorted(frame["user_id"].unique(), key=lambda u: int(u[1:]))
    items = [f"i{j}" for j in range(len(frame.attrs["item_cluster"]))]
    k = int(max(frame.attrs["item_cluster"].max(), frame.attrs["user_cluster"].max())) + 1
    dim = k + 4
    item_emb = np.zeros((len(items), dim), dtype=np.float32)
    item_emb[np.arange(len(items)), frame.attrs["item_cluster"]] = 1.0
    user_emb = np.zeros((len(users), dim), dtype=np.float32)
    user_cluster = frame.attrs["user_cluster"]
    user_emb[np.arange(len(users)), [user_cluster[int(u[1:])] for u in users]] = 1.0
    item_emb += rng.normal(0, 0.05, item_emb.shape).astype(np.float32)
    user_emb += rng.normal(0, 0.05, user_emb.shape).astype(np.float32)
    urow = {u: i for i, u in enumerate(users)}
    irow = {it: i for i, it in enumerate(items)}
    r = frame["user_id"].map(urow).to_numpy()
    c = frame["item_id"].map(irow).to_numpy()
    seen = sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(users), len(items)))
    seen.data[:] = 1.0
    popularity = np.bincount(c, minlength=len(items))
    neg_rows = [urow[u] for u, its in (feedback or {}).items() for _ in its]
    neg_cols = [irow[i] for its in (feedback or {}).values() for i in its]
    negatives = sparse.csr_matrix(
        (np.ones(len(neg_rows), np.float32), (neg_rows, neg_cols)), shape=seen.shape
    )
    return write_checkpoint(
        root,
        version=version,
        user_embeddings=user_emb,
        item_embeddings=item_emb,
        user_ids=users,
        item_ids=items,
        item_popularity=popularity,
        seen=seen,
        feedback=negatives,
        watermark=watermark,
        metrics={"ndcg@10": 0.5},
        diagnostics=[{"epoch": 1, "informative_rate": 0.4}],
    )


def embedding_checkpoint(
    root: Path,
    *,
    clustered: bool,
    n_users: int = 600,
    n_items: int = 3000,
    dim: int = 16,
    seen: sparse.csr_matrix | None = None,
) -> Path:
    """Clustered embeddings (what a trained model looks like) or structureless Gaussian ones."""
    rng = np.random.default_rng(0)
    if clustered:
        centres = rng.normal(0, 1, (40, dim)).astype(np.float32)
        items = centres[rng.integers(0, 40, n_items)] + rng.normal(0, 0.3, (n_items, dim))
        users = centres[rng.integers(0, 40, n_users)] + rng.normal(0, 0.3, (n_users, dim))
    else:
        items = rng.normal(0, 1, (n_items, dim))
        users = rng.normal(0, 1, (n_users, dim))
    if seen is None:
        seen = sparse.random(n_users, n_items, density=0.002, format="csr", random_state=0, dtype=np.float32)
        seen.data[:] = 1.0
    return write_checkpoint(
        root,
        version="v1",
        user_embeddings=users.astype(np.float32),
        item_embeddings=items.astype(np.float32),
        user_ids=[f"u{i}" for i in range(n_users)],
        item_ids=[f"i{j}" for j in range(n_items)],
        item_popularity=np.asarray(seen.sum(axis=0)).ravel().astype(np.int64),
        seen=seen,
        watermark=0,
    )


@dataclass
class Deployment:
    """A migrated database filled with the synthetic log, plus a promoted checkpoint."""

    url: str
    data_dir: Path
    frame: pd.DataFrame
    version: str = "v1"
    checkpoints: Path = field(init=False)
    user_ids: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.checkpoints = self.data_dir / "checkpoints"


def train_checkpoint(
    url: str, root: Path, version: str | None, *, strategy: str = "mixed", epochs: int = 6, tower: str = "pooled"
) -> tuple[Path, int]:
    """A real model: the trainer's pipeline on the events in the database (a few seconds on this data)."""
    from trainer.config import SamplerConfig, TrainConfig
    from trainer.pipeline import run, save  # torch, in the test process only; the server stays torch-free

    engine = make_engine(url)
    try:
        events = read_events(engine)
        with engine.connect() as conn:
            watermark = max_event_id(conn)
    finally:
        engine.dispose()
    config = TrainConfig(epochs=epochs, progress=False, threads=1, seed=0, tower=tower,
                         sampler=SamplerConfig(strategy=strategy))
    result = run(events, config, watermark=watermark, ship="all" if epochs > 1 else "tested")
    return save(result, root, version=version), watermark


def load_log(url: str, data_dir: Path, frame: pd.DataFrame) -> Deployment:
    """Migrate the database and load ``frame`` into it: a deployment without a model yet."""
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            insert_events(conn, frame)
    finally:
        engine.dispose()
    return Deployment(url, data_dir, frame)


def deploy(url: str, data_dir: Path, *, promote: bool = True, trained: bool = False) -> Deployment:
    """Migrate, load the synthetic log, write checkpoint v1 (trained, or the planted clusters), register it."""
    dep = load_log(url, data_dir, synthetic())
    frame = dep.frame
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            watermark = max_event_id(conn)
        if trained:
            path, watermark = train_checkpoint(url, dep.checkpoints, dep.version)
        else:
            path = cluster_checkpoint(dep.checkpoints, frame, dep.version, watermark=watermark)
        manifest = read_manifest(path)
        dep.user_ids, dep.item_ids = manifest_ids(path)
        with engine.begin() as conn:
            registry.register(
                conn,
                dep.version,
                str(path),
                watermark=watermark,
                metrics=manifest.get("metrics") or {},
                status="promoted" if promote else "candidate",
            )
    finally:
        engine.dispose()
    return dep


def manifest_ids(path: Path) -> tuple[list[str], list[str]]:
    return json.loads((path / "user_ids.json").read_text()), json.loads((path / "item_ids.json").read_text())


class Server:
    """``python -m uvicorn app.api.main:create_app --factory`` as a real subprocess on a free port."""

    def __init__(
        self,
        dep: Deployment,
        *,
        poll: float = 0.0,
        checkpoint: Path | None = None,
        admin_token: str | None = ADMIN_TOKEN,
        workers: int = 1,
        extra_env: dict | None = None,
    ) -> None:
        self.dep = dep
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        env.update(
            RECSYS_DATABASE_URL=dep.url,
            RECSYS_DATA_DIR=str(dep.data_dir),
            RECSYS_RELOAD_POLL_SECONDS=str(poll),
            RECSYS_LOG_LEVEL="warning",
        )
        if admin_token:
            env["RECSYS_ADMIN_TOKEN"] = admin_token
        if checkpoint is not None:
            env["RECSYS_SERVE_CHECKPOINT"] = str(checkpoint)
        env.update(extra_env or {})
        self.log_path = dep.data_dir / f"server-{self.port}.log"
        self._log = self.log_path.open("wb")
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.api.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--no-access-log",
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.base + path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=10.0, **kw)  # type: ignore[arg-type]

    def admin(self) -> httpx.Client:
        return self.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    """The one error shape, with the expected status (and code, when given)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body
