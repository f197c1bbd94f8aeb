"""The serving process must stay small and start fast (importing and building the app never imports torch),
and its layers import one way."""

from __future__ import annotations

import ast
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


def _imports(package: str) -> list[tuple[str, int, str]]:
    """(file, line, module) of every absolute import in the package's files, top level or inside functions."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((str(path.relative_to(ROOT)), node.lineno, node.module))
    return found


def test_dependencies_point_one_way() -> None:
    """docs/architecture.md: app.api → app.serving → app.db; the serving core knows nothing of HTTP, the
    database layer nothing of serving."""
    banned = {
        "app/serving": ("app.api", "fastapi", "starlette", "torch"),
        "app/db": ("app.api", "app.serving", "app.jobs", "fastapi", "starlette", "torch"),
    }
    offenders = [
        f"{path}:{line} imports {module}"
        for package, prefixes in banned.items()
        for path, line, module in _imports(package)
        if any(module == p or module.startswith(p + ".") for p in prefixes)
    ]
    assert not offenders, offenders
