"""The Python blocks of docs/ run as a user pastes them (at small sizes), so the docs cannot rot.

A block runs in a fresh folder (the datasets: the tests' tiny builds). Sizes a user would not wait for in a
test are made small: ``10_000`` updates become 20. The export page's block reads the policy its commands
write: those commands run first, the training one at small sizes.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
SMALL_RUN = ["--steps", "20", "--batch-size", "32", "--eval-every", "10", "--eval-episodes", "1",
             "--hidden-sizes", "16", "16", "--no-progress"]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


PYTHON_BLOCKS = [(page.name, i, block) for page in PAGES for i, block in enumerate(blocks(page, "python"))]


def test_every_page_is_reached_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{page.name}" in readme for page in PAGES)


@pytest.mark.parametrize("page, index, block", PYTHON_BLOCKS, ids=[f"{p}-{i}" for p, i, _ in PYTHON_BLOCKS])
def test_python_blocks_run(page, index, block, tiny_datasets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if page == "export.md":  # the block reads the policy the page's commands export
        run_commands(blocks(ROOT / "docs" / page, "bash")[0], tmp_path)
    code = block.replace("10_000", "20")
    exec(compile(code, f"docs/{page}", "exec"), {"__name__": "__docs__"})


def run_commands(block: str, cwd: Path) -> None:
    for line in block.strip().splitlines():
        command = line.split("#")[0].split()
        assert command[0] == "python", line
        command = [sys.executable, *command[1:]]
        if command[1] == "examples/iql_offline.py":
            command = [command[0], str(ROOT / command[1]), *command[2:], *SMALL_RUN]
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
        assert result.returncode == 0, (line, result.stderr[-2000:])
