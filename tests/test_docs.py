"""The Python blocks and bash commands of docs/ run as a user pastes them (at small sizes), so the docs cannot rot.

A block runs in a fresh folder (the datasets: the tests' tiny builds). Sizes a user would not wait for in a
test are made small: ``10_000`` updates become 20. The export page's block reads the policy its commands
write: those commands run first, the training one at small sizes.

The bash blocks' commands each run in a process of their own, forked from a server that has imported torch and
the package once (``multiprocessing``'s forkserver): the same script, arguments, folder and environment as the
pasted command, without paying the imports again for each of them (a command of the study block would spend
about half its time importing). A command that differs from one already run in its block only in ``--seed``
and its output folder is not run again: its output folder gets a copy of the other's, for the commands that
read it (the study's plots).
"""
import multiprocessing
import os
import re
import runpy
import shlex
import shutil
import sys
import tempfile
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
        code, output = run_python(command, cwd, os.environ, timeout=300)
        assert code == 0, (line, output[-2000:])


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
        args += ["--frames", "300", "--warmup-frames", "100", "--snapshot-every", "100", "--frames-per-batch", "100"]
    return args


# ------------------------------------------------------------------ a process per command, imports paid once
PRELOAD = ["torch", "torchrl", "tensordict", "gymnasium", "minari", "matplotlib.pyplot", "iql_torchrl",
           "iql_torchrl.datasets", "iql_torchrl.jobs.cli", "iql_torchrl.runs.run", "iql_torchrl.runs.sweep"]
_SERVER = None


def _forkserver():
    global _SERVER
    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(PRELOAD)
    return _SERVER


def _run_as_main(args: list[str], cwd: str, env: dict, log: str) -> None:
    """In the forked process: ``python ARGS`` as the interpreter would run it, output to ``log``."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path.insert(0, str(Path(args[0]).parent))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("a message"): printed, status 1, as the interpreter does
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_python(args: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str]:
    """``args`` (``[sys.executable, ...]``) run in a fresh process forked from the preloaded server:
    its exit code and its output (stdout and stderr together)."""
    assert args[0] == sys.executable, args
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        process = _forkserver().Process(target=_run_as_main, args=(args[1:], str(cwd), dict(env), log.name))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            return -9, f"timed out after {timeout} s\n" + log.read()
        return process.exitcode, log.read()


def seed_or_folder_only(command: str) -> str:
    """The command with the values of ``--seed`` (a number) and its output folder left out."""
    return re.sub(r"(--seed) \d+|(--output-dir|--out) \S+", lambda m: f"{m.group(1) or m.group(2)} _", command)


def output_folder(command: str) -> str | None:
    found = re.search(r"(?:--output-dir|--out) (\S+)", command)
    return found and found.group(1)


BASH_BLOCKS = [(page.name, i, block) for page in PAGES for i, block in enumerate(blocks(page, "bash"))]


@pytest.mark.slow
@pytest.mark.parametrize("page, index, block", BASH_BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BASH_BLOCKS])
def test_bash_blocks_run(page, index, block, tmp_path):
    # each command of the block in order, in a fresh folder (runs/ lands there) with an empty datasets
    # folder (a command builds what it needs, as on a user's first run), at small sizes
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    if OFFLINE_RUN in block:
        offline = [sys.executable, str(ROOT / "examples" / "iql_offline.py"), "--output-dir",
                   str(tmp_path / "offline-run"), *SMALL_RUN]
        code, output = run_python(offline, tmp_path, env, timeout=300)
        assert code == 0, (offline, output[-3000:])
    built, ran = set(), {}
    for command in shell_commands(block):
        twin = ran.get(seed_or_folder_only(command))
        if twin is not None:
            if output_folder(twin) and (tmp_path / output_folder(twin)).is_dir():
                shutil.copytree(tmp_path / output_folder(twin), tmp_path / output_folder(command))
            continue
        ran[seed_or_folder_only(command)] = command
        for dataset in re.findall(r"--dataset (iql_torchrl/(?:hopper|walker2d|halfcheetah|pointmaze)/\S+)", command):
            # a locomotion or maze set of 4 episodes first (once a block): the command would build its full set
            if dataset not in built:
                build = [sys.executable, "-m", "iql_torchrl.datasets", "build", dataset, "--episodes", "4"]
                code, output = run_python(build, tmp_path, env, timeout=300)
                assert code == 0, (build, output[-3000:])
                built.add(dataset)
        args = small(command, tmp_path)
        code, output = run_python(args, tmp_path, env, timeout=600)
        assert code == 0, (command, args, output[-3000:])


@pytest.mark.slow  # as the tests that run commands so
def test_a_command_run_in_a_forked_process_fails_and_reports_as_the_interpreter_would(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nprint('args', sys.argv[1:], os.getcwd(), os.environ['MARK'])\n"
                      "sys.exit(int(sys.argv[1]))\n")
    env = {**os.environ, "MARK": "here"}
    assert run_python([sys.executable, str(script), "0"], tmp_path, env, 60) == (
        0, f"args ['0'] {tmp_path} here\n")
    code, output = run_python([sys.executable, str(script), "3"], tmp_path, env, 60)
    assert code == 3
    code, output = run_python([sys.executable, "-m", "iql_torchrl.datasets", "build", "no/such-v0"], tmp_path, env, 60)
    assert code != 0 and "no/such-v0" in output
    script.write_text("import sys\nsys.exit('stopped: a message')\n")
    assert run_python([sys.executable, str(script)], tmp_path, env, 60) == (1, "stopped: a message\n")
    script.write_text("raise ValueError('a clear message')\n")
    code, output = run_python([sys.executable, str(script)], tmp_path, env, 60)
    assert code == 1 and "ValueError: a clear message" in output
    assert seed_or_folder_only("python x.py --seed 3 --steps 9 --output-dir runs/a") == (
        "python x.py --seed _ --steps 9 --output-dir _")
    assert seed_or_folder_only("python x.py --seed 3 --out a") != seed_or_folder_only("python x.py --out a --steps 2")


def test_the_commands_are_made_small_as_the_test_says():
    # the substitutions the bash-block test relies on, checked on a made-up block
    block = "python examples/iql_offline.py --steps 1000000  # long\npython -m iql_torchrl.datasets build X [--episodes N] \\\n  --seed 1\n"
    first, second = (small(c, Path("/tmp/t")) for c in shell_commands(block))
    assert first[-len(SMALL_RUN):] == SMALL_RUN and first[1] == str(ROOT / "examples/iql_offline.py")
    assert second[1:] == ["-m", "iql_torchrl.datasets", "build", "X", "--seed", "1", "--episodes", "4"]
