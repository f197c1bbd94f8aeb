"""The project's own promises: README commands are the ones CI runs, the code is lint-clean, serving is torch-free."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_latter() -> None:
    demo, tests = readme_commands()
    assert demo.endswith("recsys demo")
    assert tests.endswith("pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_ruff_is_clean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys; from app.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_every_cli_command_has_help() -> None:
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in ("import", "export", "synth", "serve", "demo", "db"):
        assert name in top.output
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, name


def test_help_reads_on_an_80_column_terminal() -> None:
    """Plain help, no boxed panels (which squeezed descriptions into a narrow column), and every
    command's one-line summary whole in its group's list (click cuts a long one short with "...")."""
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()
    for group in ([], ["db"], ["models"], ["negatives"], ["train"], ["serve"]):
        result = runner.invoke(app, [*group, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0, group
        assert not any(c in result.output for c in "│╭╰"), result.output
        assert all(len(line) <= 80 for line in result.output.splitlines()), result.output
        listed = result.output.partition("Commands:")[2].splitlines()
        assert not [line for line in listed if line.endswith("...")], result.output


def test_trainer_never_imports_app() -> None:
    """Dependencies point one way (DESIGN.md): the trainer is a library that knows nothing of the service."""
    import ast

    offenders = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n == "app" or n.startswith("app.")]
    assert not offenders, offenders
