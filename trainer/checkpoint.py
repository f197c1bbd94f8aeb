"""The trainer–service contract: a versioned checkpoint directory on disk.

Torch-free on purpose: the service reads checkpoints with numpy + faiss only.
A checkpoint is written under a temporary name and renamed into place when
complete, so a reader never sees half of one. The manifest lists every file
with its SHA-256; the reader refuses anything missing, extra-short or altered.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from trainer.towers import UserTower

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Files every checkpoint has; extra files (torch state, reports) are listed in the manifest too.
USER_EMB = "user_embeddings.npy"
ITEM_EMB = "item_embeddings.npy"
USER_IDS = "user_ids.json"
ITEM_IDS = "item_ids.json"
POPULARITY = "item_popularity.npy"
SEEN_INDPTR = "seen_indptr.npy"
SEEN_INDICES = "seen_indices.npy"
FEEDBACK_INDPTR = "feedback_indptr.npy"  # optional: explicit negatives, never recommended to their user
FEEDBACK_INDICES = "feedback_indices.npy"
INDEX = "index.faiss"
# optional, written when the user tower has them (trainer/towers.py): the pooled history table and,
# when a tower both pools and keeps free vectors, the free part alone
HISTORY_EMB = "history_embeddings.npy"
USER_FREE_EMB = "user_free_embeddings.npy"
REQUIRED = (USER_EMB, ITEM_EMB, USER_IDS, ITEM_IDS, POPULARITY, SEEN_INDPTR, SEEN_INDICES, INDEX)


class CheckpointError(Exception):
    """A checkpoint that is missing, partial, corrupt or of an unknown format."""


@dataclass
class Checkpoint:
    """A verified checkpoint, loaded into memory (or memory-mapped)."""

    path: Path
    manifest: dict[str, Any]
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    user_ids: list[str]
    item_ids: list[str]
    item_popularity: np.ndarray
    seen: sparse.csr_matrix
    feedback: sparse.csr_matrix | None = None
    history_embeddings: np.ndarray | None = None  # (n_items, tower dim) when the tower pools history
    user_free_embeddings: np.ndarray | None = None  # (n_users, tower dim) when it pools and has free vectors
    user_row: dict[str, int] = field(default_factory=dict)
    item_row: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feedback is None:
            self.feedback = sparse.csr_matrix(self.seen.shape, dtype=np.float32)
        if not self.user_row:
            self.user_row = {u: i for i, u in enumerate(self.user_ids)}
        if not self.item_row:
            self.item_row = {it: i for i, it in enumerate(self.item_ids)}

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def watermark(self) -> int | None:
        return self.manifest.get("watermark")

    @property
    def tower(self) -> UserTower:
        """How a user's query vector is made from their items (trainer/towers.py)."""
        return UserTower.from_manifest(self.manifest)

    @property
    def index_settings(self) -> dict[str, Any] | None:
        """The FAISS index's settings (kind, nlist, nprobe, M, efSearch, efConstruction); None for
        checkpoints written before the manifest recorded them."""
        settings = self.manifest.get("index_settings")
        return dict(settings) if isinstance(settings, dict) else None

    def load_index(self) -> Any:
        """Read the FAISS index stored with the embeddings."""
        import faiss

        return faiss.read_index(str(self.path / INDEX))

    def extra_file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise CheckpointError(f"{self.path}: checkpoint has no file {name!r}")
        return self.path / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def build_flat_index(item_embeddings: np.ndarray) -> Any:
    """Exact inner-product index: the default for catalogues that fit in memory."""
    import faiss

    index = faiss.IndexFlatIP(int(item_embeddings.shape[1]))
    index.add(np.ascontiguousarray(item_embeddings, dtype=np.float32))
    return index


def new_version() -> str:
    """A sortable, unique model version id: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


def write_checkpoint(
    root: str | Path,
    *,
    version: str,
    user_embeddings: np.ndarray,
    item_embeddings: np.ndarray,
    user_ids: list[str],
    item_ids: list[str],
    item_popularity: np.ndarray,
    seen: sparse.csr_matrix,
    feedback: sparse.csr_matrix | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    diagnostics: list[Mapping[str, Any]] | None = None,
    watermark: int | None = None,
    index: Any = None,
    extra_files: Mapping[str, bytes] | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    index_settings: Mapping[str, Any] | None = None,
    tower: UserTower | None = None,
    history_embeddings: np.ndarray | None = None,
    user_free_embeddings: np.ndarray | None = None,
) -> Path:
    """Write a complete checkpoint to ``root/version`` atomically and return its path.

    ``index`` is a FAISS index over ``item_embeddings`` (exact inner product when None); its settings
    (kind, nlist, nprobe, M, efSearch, efConstruction) go into the manifest as ``index_settings``, read
    from the index unless given.
    ``extra_files`` maps file names to bytes (e.g. the torch state ``model.pt``). ``tower`` (recorded in
    the manifest) says how ``user_embeddings`` were made, with its tables when it has them, so that the
    service can make the same vectors from newer events.
    """
    if not VERSION_RE.match(version):
        raise CheckpointError(f"invalid model version {version!r}: use letters, digits, '.', '_' or '-'")
    user_embeddings = np.ascontiguousarray(user_embeddings, dtype=np.float32)
    item_embeddings = np.ascontiguousarray(item_embeddings, dtype=np.float32)
    seen = sparse.csr_matrix(seen)
    feedback = None if feedback is None else sparse.csr_matrix(feedback)
    tables = {HISTORY_EMB: history_embeddings, USER_FREE_EMB: user_free_embeddings}
    _check_shapes(user_embeddings, item_embeddings, user_ids, item_ids, item_popularity, seen, feedback, tables)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise CheckpointError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
    try:
        _write_arrays(tmp, user_embeddings, item_embeddings, user_ids, item_ids, item_popularity, seen, feedback,
                      tables)
        index, index_settings = _write_index(tmp, index, item_embeddings, index_settings)
        _write_extra_files(tmp, extra_files or {}, tables)
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = _manifest(version, user_embeddings, user_ids, item_ids, seen, feedback, index, index_settings,
                             files, watermark=watermark, config=config, metrics=metrics, diagnostics=diagnostics,
                             tower=tower)
        manifest.update(extra_manifest or {})
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_extra_files(tmp: Path, extra_files: Mapping[str, bytes], tables: Mapping[str, Any]) -> None:
    """The caller's own files (the torch state ``model.pt``), under names that cannot shadow ours."""
    for name, data in extra_files.items():
        if "/" in name or name in REQUIRED or name in tables or name == MANIFEST:
            raise CheckpointError(f"invalid extra file name {name!r}")
        _write_file(tmp / name, data)


def _manifest(version: str, user_embeddings: np.ndarray, user_ids: list[str], item_ids: list[str],
              seen: sparse.csr_matrix, feedback: sparse.csr_matrix | None, index: Any,
              index_settings: Mapping[str, Any], files: Mapping[str, Any], *, watermark: int | None,
              config: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None,
              diagnostics: list[Mapping[str, Any]] | None, tower: UserTower | None) -> dict[str, Any]:
    """What the reader checks (format, counts, checksums) and what people read (config, metrics)."""
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dim": int(user_embeddings.shape[1]),
        "n_users": len(user_ids),
        "n_items": len(item_ids),
        "n_seen": int(seen.nnz),
        "n_feedback": int(feedback.nnz) if feedback is not None else 0,
        "index_type": type(index).__name__,
        "index_settings": index_settings,
        "score": "dot",
        "watermark": watermark,
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
        "diagnostics": list(diagnostics or []),
        "files": dict(files),
    }
    if tower is not None:
        manifest["user_tower"] = tower.to_dict()
    return manifest


def _check_shapes(user_embeddings: np.ndarray, item_embeddings: np.ndarray, user_ids: list[str],
                  item_ids: list[str], item_popularity: np.ndarray, seen: sparse.csr_matrix,
                  feedback: sparse.csr_matrix | None, tables: Mapping[str, np.ndarray | None]) -> None:
    """Refuse parts that do not fit together, before anything is written."""
    n_users, dim = user_embeddings.shape
    n_items = item_embeddings.shape[0]
    if item_embeddings.shape[1] != dim:
        raise CheckpointError("user and item embeddings have different dimensions")
    if len(user_ids) != n_users or len(item_ids) != n_items:
        raise CheckpointError("id maps and embedding tables disagree in length")
    if item_popularity.shape != (n_items,):
        raise CheckpointError("item_popularity must have one count per item")
    if seen.shape != (n_users, n_items):
        raise CheckpointError(f"seen matrix shape {seen.shape} != {(n_users, n_items)}")
    if feedback is not None and feedback.shape != (n_users, n_items):
        raise CheckpointError(f"feedback matrix shape {feedback.shape} != {(n_users, n_items)}")
    for name, table in tables.items():
        rows = n_items if name == HISTORY_EMB else n_users
        if table is not None and (table.ndim != 2 or table.shape[0] != rows):
            raise CheckpointError(f"{name} must have {rows} rows, got shape {table.shape}")


def _write_arrays(tmp: Path, user_embeddings: np.ndarray, item_embeddings: np.ndarray, user_ids: list[str],
                  item_ids: list[str], item_popularity: np.ndarray, seen: sparse.csr_matrix,
                  feedback: sparse.csr_matrix | None, tables: Mapping[str, np.ndarray | None]) -> None:
    _save_npy(tmp / USER_EMB, user_embeddings)
    _save_npy(tmp / ITEM_EMB, item_embeddings)
    _write_file(tmp / USER_IDS, json.dumps([str(u) for u in user_ids]).encode())
    _write_file(tmp / ITEM_IDS, json.dumps([str(i) for i in item_ids]).encode())
    _save_npy(tmp / POPULARITY, np.asarray(item_popularity, dtype=np.int64))
    _save_csr(tmp, SEEN_INDPTR, SEEN_INDICES, seen)
    if feedback is not None:
        _save_csr(tmp, FEEDBACK_INDPTR, FEEDBACK_INDICES, feedback)
    for name, table in tables.items():
        if table is not None:
            _save_npy(tmp / name, np.ascontiguousarray(table, dtype=np.float32))


def _save_csr(tmp: Path, indptr_name: str, indices_name: str, m: sparse.csr_matrix) -> None:
    """A users x items 0/1 matrix as its CSR arrays (``_read_csr`` reads them back)."""
    _save_npy(tmp / indptr_name, m.indptr.astype(np.int64))
    _save_npy(tmp / indices_name, m.indices.astype(np.int32))


def _write_index(tmp: Path, index: Any, item_embeddings: np.ndarray,
                 settings: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any] | None]:
    """The serving index (exact inner product when None) written to ``tmp``, with its settings: as
    given, else read from the index (None for a type the chooser does not make)."""
    import faiss

    if index is None:
        index = build_flat_index(item_embeddings)
    if index.ntotal != item_embeddings.shape[0]:
        raise CheckpointError(f"FAISS index holds {index.ntotal} vectors, expected {item_embeddings.shape[0]}")
    faiss.write_index(index, str(tmp / INDEX))
    if settings is None:
        from trainer.indexes import settings_of

        try:
            settings = settings_of(index).to_dict()
        except ValueError:  # an index type the chooser does not make: the class name says enough
            return index, None
    return index, dict(settings)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a manifest without loading the arrays."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (partial or not a checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: manifest is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format_version {manifest.get('format_version')} is not the supported {FORMAT_VERSION}"
        )
    for key in ("model_version", "dim", "n_users", "n_items", "files"):
        if key not in manifest:
            raise CheckpointError(f"{mpath}: manifest lacks {key!r}")
    missing = [f for f in REQUIRED if f not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{mpath}: manifest does not list {missing}")
    return manifest


def verify_files(path: Path, manifest: Mapping[str, Any]) -> None:
    for name, meta in manifest["files"].items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        if fpath.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{path}: file {name} has {fpath.stat().st_size} bytes, expected {meta['bytes']}"
            )
        if _sha256(fpath) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {name} fails its checksum (corrupt)")


def read_checkpoint(path: str | Path, *, mmap: bool = False, verify: bool = True) -> Checkpoint:
    """Load and verify a checkpoint; raise CheckpointError with the reason when it is unusable.

    ``mmap=True`` memory-maps the embedding tables so that several worker processes share one copy.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    mode = "r" if mmap else None
    try:
        user_emb = np.load(path / USER_EMB, mmap_mode=mode, allow_pickle=False)
        item_emb = np.load(path / ITEM_EMB, mmap_mode=mode, allow_pickle=False)
        user_ids = json.loads((path / USER_IDS).read_text())
        item_ids = json.loads((path / ITEM_IDS).read_text())
        popularity = np.load(path / POPULARITY, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read arrays ({exc})") from exc
    n_users, n_items, dim = manifest["n_users"], manifest["n_items"], manifest["dim"]
    if user_emb.shape != (n_users, dim) or item_emb.shape != (n_items, dim):
        raise CheckpointError(f"{path}: embedding shapes disagree with the manifest")
    if len(user_ids) != n_users or len(item_ids) != n_items or popularity.shape != (n_items,):
        raise CheckpointError(f"{path}: id maps or popularity disagree with the manifest")
    seen = _read_csr(path, SEEN_INDPTR, SEEN_INDICES, (n_users, n_items), "seen-items matrix")
    feedback = (_read_csr(path, FEEDBACK_INDPTR, FEEDBACK_INDICES, (n_users, n_items), "feedback matrix")
                if FEEDBACK_INDPTR in manifest["files"] else None)
    tables = {}
    for name, rows in ((HISTORY_EMB, n_items), (USER_FREE_EMB, n_users)):
        if name not in manifest["files"]:
            continue
        try:
            tables[name] = np.load(path / name, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read {name} ({exc})") from exc
        if tables[name].ndim != 2 or tables[name].shape[0] != rows:
            raise CheckpointError(f"{path}: {name} has shape {tables[name].shape}, expected {rows} rows")
    return Checkpoint(
        path=path,
        manifest=manifest,
        history_embeddings=tables.get(HISTORY_EMB),
        user_free_embeddings=tables.get(USER_FREE_EMB),
        user_embeddings=user_emb,
        item_embeddings=item_emb,
        user_ids=user_ids,
        item_ids=item_ids,
        item_popularity=popularity,
        seen=seen,
        feedback=feedback,
    )


def _read_csr(path: Path, indptr_name: str, indices_name: str, shape: tuple[int, int],
              what: str) -> sparse.csr_matrix:
    """A users x items 0/1 matrix stored as its CSR arrays, checked against ``shape``."""
    try:
        indptr = np.load(path / indptr_name, allow_pickle=False)
        indices = np.load(path / indices_name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc})") from exc
    if indptr.shape != (shape[0] + 1,) or (indices.size and int(indices.max()) >= shape[1]):
        raise CheckpointError(f"{path}: {what} is inconsistent")
    return sparse.csr_matrix((np.ones(indices.size, dtype=np.float32), indices, indptr), shape=shape)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under root that have a manifest, oldest first (temporary ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: p.name)
