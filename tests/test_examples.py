"""The README's example and the scripts in examples/ run as written."""
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_steps_the_networks():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    loss = scope["loss"]
    assert all(torch.isfinite(scope["out"][k]) for k in ("loss_value", "loss_qvalue", "loss_actor"))
    stepped = scope["optimizer"].state  # Adam keeps a state for every parameter it stepped
    assert len(stepped) == len(list(loss.parameters())) and all(s["step"] == 1 for s in stepped.values())


def test_custom_actor_example_trains():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_actor.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss_actor" in result.stdout
