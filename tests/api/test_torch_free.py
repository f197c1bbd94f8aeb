"""The serving process must stay small and start fast: importing and building the app never imports torch."""

from __future__ import annotations

import subprocess
import sys

from api_support import ROOT

CODE = """
import sys
from app.api.main import create_app
import app.api.admin, app.api.server, trainer.checkpoint
create_app()
try:
    import trainer.inspect_negatives  # the admin route imports it lazily; it must be torch-free too
except ImportError:
    pass
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH" if bad else "CLEAN", bad[:3])
"""


def test_app_factory_does_not_import_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CLEAN"), out.stdout
