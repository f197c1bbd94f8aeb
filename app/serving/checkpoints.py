"""Finding the checkpoint a path names: a version directory itself, or the newest valid one under a root.

``recsys train --out DIR`` writes ``DIR/<version>/``; every command that takes ``--checkpoint`` (serve,
recommend, negatives show) accepts either, through ``resolve_checkpoint``. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.checkpoint import MANIFEST, CheckpointError, list_checkpoints, read_manifest, verify_files


def _created(path: Path) -> str:
    try:
        return str(json.loads((path / MANIFEST).read_text()).get("created_at", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def newest_first(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, newest first: by the manifest's ``created_at``, then name
    (version ids sort by time; named versions such as v9 and v10 do not)."""
    return sorted(list_checkpoints(root), key=lambda p: (_created(p), p.name), reverse=True)


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory ``path`` names (resolved): ``path`` itself when it has a manifest, else the
    newest checkpoint under it whose manifest and checksums are valid. CheckpointError says why none is."""
    path = Path(path)
    if (path / MANIFEST).is_file() or not path.is_dir():
        read_manifest(path)  # a clear error for a missing path or a broken manifest
        return path.resolve()
    refused = []
    for candidate in newest_first(path):
        try:
            verify_files(candidate, read_manifest(candidate))
        except CheckpointError as exc:
            refused.append(str(exc))
            continue
        return candidate.resolve()
    if not refused:
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}) and holds no checkpoint directories")
    raise CheckpointError(f"{path}: none of its {len(refused)} checkpoints is valid: " + "; ".join(refused))
