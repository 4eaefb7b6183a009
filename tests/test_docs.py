"""The Python blocks and bash commands of docs/ run as a user pastes them (at small sizes), so the docs cannot rot.

A block runs in a fresh folder (the datasets: the tests' tiny builds). Sizes a user would not wait for in a
test are made small: ``10_000`` updates become 20. The export page's block reads the policy its commands
write: those commands run first, the training one at small sizes.
"""
import os
import re
import shlex
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


# blocks that compile the job's step or run the job (the fast tier tests both elsewhere): the slow tier runs them
SLOW_PAGES = {"fused-step.md", "export.md"}
PYTHON_BLOCKS = [pytest.param(page.name, i, block, id=f"{page.name}-{i}",
                              marks=[pytest.mark.slow] if page.name in SLOW_PAGES else [])
                 for page in PAGES for i, block in enumerate(blocks(page, "python"))]


def test_every_page_is_reached_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{page.name}" in readme for page in PAGES)


@pytest.mark.parametrize("page, index, block", PYTHON_BLOCKS)
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


# ------------------------------------------------------------------ the docs' commands
# what each command gets appended (or which arguments change) so that it runs in seconds
SMALL_FINETUNE = ["--online-steps", "40", "--frames-per-batch", "20", "--num-envs", "2", "--eval-every", "20",
                  "--eval-episodes", "1", "--batch-size", "32", "--no-progress"]
SMALL_FRESH_FINETUNE = ["--offline-steps", "10", "--hidden-sizes", "16", "16"]
SMALL_BENCH = {
    "plain_iql.py": ["--steps", "20", "--eval-every", "20", "--eval-episodes", "1"],
    "evaluation_noise.py": ["--episodes", "2", "--draws", "10"],
    "bench_maze_values.py": ["--steps", "20", "--eval-episodes", "1"],
    "bench_scores.py": ["--steps", "20", "--eval-every", "20", "--eval-episodes", "1", "--seeds", "1",
                        "--hidden-sizes", "16", "16", "--expectiles", "0.7", "--temperatures", "3",
                        "--datasets", "iql_torchrl/pendulum/mixed-v0"],
}
OFFLINE_RUN = "runs/<an offline run>"  # a placeholder the pages use: the test's own small offline run


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuations joined, comments and ``[optional]`` arguments left out."""
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\[[^\]]*\]", "", line.split("  #")[0].split(" # ")[0]).strip()
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def small(command: str, tmp_path: Path) -> list[str]:
    """``command`` as the test runs it: the interpreter under test, small sizes, outputs in ``tmp_path``."""
    words = shlex.split(command.replace(OFFLINE_RUN, str(tmp_path / "offline-run")))  # as a shell reads quotes
    if words[0] == "torchrun":
        words = ["python", "-m", "torch.distributed.run", *words[1:]]
    assert words[0] == "python", command
    args = [sys.executable, *words[1:]]
    script = next((w for w in words if w.endswith(".py")), None)
    if script is not None:
        args[args.index(script)] = str(ROOT / script)
        name = Path(script).name
        if name == "iql_offline.py":
            args += SMALL_RUN
        elif name == "iql_finetune.py":
            args += SMALL_FINETUNE + ([] if "--checkpoint" in words else SMALL_FRESH_FINETUNE)
        elif name in SMALL_BENCH:
            args += SMALL_BENCH[name]
        for i, word in enumerate(args[:-1]):  # results go to the test's folder; earlier results are read from the repo
            if word in ("--json", "--png"):
                args[i + 1] = str(tmp_path / Path(args[i + 1]).name)
            elif word == "--with":
                args[i + 1] = str(ROOT / args[i + 1])
    elif words[1:4] == ["-m", "iql_torchrl.datasets", "build"]:
        args += ["--episodes", "4"]
    elif words[1:4] == ["-m", "iql_torchrl.datasets", "train-behaviour"]:
        args += ["--frames", "300", "--warmup-frames", "100", "--snapshot-every", "100"]
    return args


BASH_BLOCKS = [(page.name, i, block) for page in PAGES for i, block in enumerate(blocks(page, "bash"))]


@pytest.mark.slow
@pytest.mark.parametrize("page, index, block", BASH_BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BASH_BLOCKS])
def test_bash_blocks_run(page, index, block, tmp_path):
    # each command of the block in order, in a fresh folder (runs/ lands there) with an empty datasets
    # folder (a command builds what it needs, as on a user's first run), at small sizes
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    if OFFLINE_RUN in block:
        subprocess.run([sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--output-dir",
                        str(tmp_path / "offline-run"), *SMALL_RUN], cwd=tmp_path, check=True, capture_output=True,
                       timeout=300, env=env)
    built = set()
    for command in shell_commands(block):
        for dataset in re.findall(r"--dataset (iql_torchrl/(?:hopper|walker2d|halfcheetah|pointmaze)/\S+)", command):
            # a locomotion or maze set of 4 episodes first (once a block): the command would build its full set
            if dataset not in built:
                subprocess.run([sys.executable, "-m", "iql_torchrl.datasets", "build", dataset, "--episodes", "4"],
                               cwd=tmp_path, check=True, capture_output=True, timeout=300, env=env)
                built.add(dataset)
        args = small(command, tmp_path)
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, (command, args, result.stderr[-3000:])


def test_the_commands_are_made_small_as_the_test_says():
    # the substitutions the bash-block test relies on, checked on a made-up block
    block = "python examples/iql_offline.py --steps 1000000  # long\npython -m iql_torchrl.datasets build X [--episodes N] \\\n  --seed 1\n"
    first, second = (small(c, Path("/tmp/t")) for c in shell_commands(block))
    assert first[-len(SMALL_RUN):] == SMALL_RUN and first[1] == str(ROOT / "examples/iql_offline.py")
    assert second[1:] == ["-m", "iql_torchrl.datasets", "build", "X", "--seed", "1", "--episodes", "4"]
