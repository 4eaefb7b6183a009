"""Run configuration: the paper's presets and the settings every run shares.

:class:`RunConfig` holds the fields both jobs have (data, networks, loss, optimiser, evaluation,
logging, the run folder); the offline job's :class:`OfflineConfig` (``examples/iql_offline.py``) and the
fine-tuning :class:`~iql_torchrl.jobs.finetune.FinetuneConfig` extend it (a subclass may override a
default, never restate a field). ``tyro`` turns a config class into the command line
(:func:`parse_cli`), with one ``--flag-name`` per field.

Every setting is checked before any work starts (:meth:`RunConfig.check`): an error names the
flag and its valid range.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from iql_torchrl.datasets import DEFAULT_DATASET, dataset_id_problem
from iql_torchrl.objectives.checks import is_finite_number
from iql_torchrl.runs.sweep import sweep_problem, sweep_values, swept_names
from iql_torchrl.step.update import optimizer_settings_problem

__all__ = [
    "Preset", "PRESETS", "PRESET_FIELDS", "auto_preset", "preset_choice", "describe_preset", "normalization_choice",
    "describe_normalization", "locomotion_family", "LOCOMOTION_FAMILIES", "RunConfig", "OfflineConfig", "ConfigError", "RUN_NEUTRAL_SETTINGS", "flag", "parse_cli", "given_fields",
    "config_to_dict", "config_from_dict", "conflicting_flags", "logger_problem",
]


@dataclass(frozen=True)
class Preset:
    """The paper's per-domain hyperparameters (appendix B)."""

    expectile: float
    temperature: float
    actor_dropout: float
    reward_transform: str
    eval_episodes: int = 10
    """Evaluation episodes when --eval-episodes is not given (the paper's 100 on the mazes; 50 on walker2d)."""
    success_terminal: bool = False
    """Goal data with the goal out of the input: the relabelled successes are terminal when --success-terminal
    is not given (D4RL AntMaze's convention: the goal absorbs, and with r − 1 every value lies in [−1/(1−γ), 0])."""
    actor: str = "gaussian"
    """The policy on Box actions when --actor is not given: the paper's gaussian, or deterministic."""
    tau: float = 0.005
    """The critics' soft target update rate when --tau is not given (the paper's 0.005)."""


PRESETS = {
    "mujoco": Preset(expectile=0.7, temperature=3.0, actor_dropout=0.0, reward_transform="locomotion"),
    # CORL's IQL on hopper medium and medium-replay: the paper's β, τ and rewards with a deterministic actor and a
    # slower target. Chosen by the study (docs/locomotion.md): on the local hopper medium-replay it ends 6.9 under
    # its best where the mujoco preset ends 10.2 under, and on hopper medium-expert it holds as the mujoco preset does
    "hopper": Preset(expectile=0.7, temperature=3.0, actor_dropout=0.0, reward_transform="locomotion",
                     actor="deterministic", tau=0.001),
    # the hopper preset's setting, on walker2d by the study's own evidence (CORL keeps the paper's there): on the local
    # walker2d medium-replay its final policies score 41.1 over 200 episodes where the mujoco preset's score 33.3, and
    # it ends 18.6 under its best against 21.1; on walker2d medium-expert it holds as the mujoco preset does. Evaluated
    # over 50 episodes: over 10, a walker2d policy's evaluations alone spread its best single one 12.6 above its last
    # on average; over 50, 5.4, and the preset's medium-replay run ends 9.7 under its best (1M updates, 3 seeds)
    "walker2d": Preset(expectile=0.7, temperature=3.0, actor_dropout=0.0, reward_transform="locomotion",
                       actor="deterministic", tau=0.001, eval_episodes=50),
    "antmaze": Preset(expectile=0.9, temperature=10.0, actor_dropout=0.0, reward_transform="antmaze",
                      eval_episodes=100, success_terminal=True),
    "kitchen": Preset(expectile=0.7, temperature=0.5, actor_dropout=0.1, reward_transform="none"),
    "adroit": Preset(expectile=0.7, temperature=0.5, actor_dropout=0.1, reward_transform="none"),
    # sparse goal-reaching rewards, AntMaze's regime: the goal absorbing (relabelled successes terminal) and
    # r − 1, so no value can pass 0 and the upper expectile stitches without running away. Chosen by the
    # sweep over umaze, medium and medium-stitch (benchmarks/README.md, "The goal preset"): on the sum of the
    # three scores and on success against the continuing data's best (τ 0.5, β 3), whose values stay bounded
    # only at τ 0.5 (an expectile above ½ drives V past max |r| / (1 − γ) on continuing data)
    "maze": Preset(expectile=0.9, temperature=10.0, actor_dropout=0.0, reward_transform="antmaze",
                   eval_episodes=100, success_terminal=True),
    # goal data kept continuing, rewards as stored: the best continuing cell of the same sweep, and the only
    # expectile whose values stay bounded there
    "maze-continuing": Preset(expectile=0.5, temperature=3.0, actor_dropout=0.0, reward_transform="none", eval_episodes=100),
}

# --preset auto: the dataset id's prefix decides (first match wins); builder datasets declare theirs.
AUTO_PRESETS = (
    ("D4RL/antmaze/", "antmaze"),
    ("D4RL/pointmaze/", "maze"),
    ("mujoco/hopper/", "hopper"), ("mujoco/walker2d/", "walker2d"), ("mujoco/", "mujoco"),
    ("D4RL/hopper", "hopper"), ("D4RL/halfcheetah", "mujoco"), ("D4RL/walker2d", "walker2d"),
    ("D4RL/kitchen/", "kitchen"),
    ("D4RL/door", "adroit"), ("D4RL/hammer", "adroit"), ("D4RL/pen", "adroit"), ("D4RL/relocate", "adroit"),
)


def auto_preset(dataset_id: str) -> tuple[str, str]:
    """``(preset, reason)`` for ``--preset auto``: a builder dataset's declared preset, else the id's prefix
    (:data:`AUTO_PRESETS`), else ``maze`` for goal data on disk with one fixed evaluation goal
    (:func:`~iql_torchrl.data.is_fixed_goal_data`), else ``mujoco``; the reason says which rule chose."""
    from iql_torchrl.data import is_fixed_goal_data
    from iql_torchrl.datasets import BUILDERS

    if dataset_id in BUILDERS:
        preset = BUILDERS[dataset_id].preset
        return preset, f"auto: the builder dataset {dataset_id} declares the {preset} preset"
    for prefix, preset in AUTO_PRESETS:
        if dataset_id.startswith(prefix):
            return preset, f"auto: {prefix}* datasets use the {preset} preset"
    goal_data = is_fixed_goal_data(dataset_id)
    if goal_data:
        return "maze", (f"auto: {dataset_id} is goal data (achieved_goal, desired_goal) with one fixed evaluation "
                        "goal, so the maze preset is used (pass --preset to choose another)")
    unread = " (not on disk yet, so its data was not inspected)" if goal_data is None else ""
    return "mujoco", (f"auto: no preset is known for {dataset_id}{unread}, so the mujoco preset is used "
                      "(pass --preset to choose another)")


def preset_choice(config) -> tuple[str, str]:
    """``(preset, reason)`` of a config as given: ``auto`` resolved from the dataset, an explicit one as is."""
    if config.preset == "auto":
        return auto_preset(config.dataset)
    return config.preset, f"--preset {config.preset} given"


# --normalize-observations auto: the MuJoCo locomotion families, whose data CORL's IQL standardises
LOCOMOTION_FAMILIES = ("hopper", "walker2d", "halfcheetah", "ant", "humanoid", "swimmer")


def locomotion_family(dataset_id: str) -> str | None:
    """The MuJoCo locomotion family of a dataset (``"hopper"`` …), or ``None``: a builder dataset's environment,
    else the id's environment segment (``mujoco/hopper/medium-v0``, ``D4RL/hopper-medium-v2``)."""
    from iql_torchrl.datasets import BUILDERS

    env_id = getattr(BUILDERS.get(dataset_id), "env_id", None)
    if env_id is not None:
        name = env_id.split("/")[-1].split("-v")[0].lower()
    else:
        parts = dataset_id.split("/")
        name = parts[1].split("-")[0].lower() if len(parts) > 1 else ""
    return name if name in LOCOMOTION_FAMILIES else None


def normalization_choice(config) -> tuple[bool, str]:
    """``(normalize, reason)`` for a config's ``--normalize-observations``: auto resolved from the dataset."""
    if config.normalize_observations != "auto":
        return config.normalize_observations == "yes", f"--normalize-observations {config.normalize_observations} given"
    family = locomotion_family(config.dataset)
    if family is not None:
        return True, f"auto: {config.dataset} is MuJoCo locomotion data ({family}), which CORL's IQL standardises"
    return False, f"auto: {config.dataset} is not MuJoCo locomotion data, the only data auto standardises"


def describe_normalization(normalize: bool, reason: str) -> str:
    """The preset line's clause on the observations: standardised or as stored, and why."""
    what = "standardised by the dataset's mean and std + 1e-3" if normalize else "as stored"
    return f"observations {what} ({reason})"


# the run's settings a preset supplies (the console's preset line shows them; the target rate and the actor where
# the preset's or the run's are not the paper's)
PRESET_FIELDS = ("expectile", "temperature", "reward_transform", "tau", "actor")
SHOWN_NAMES = {"reward_transform": "reward transform", "tau": "target rate"}


def describe_preset(name: str, reason: str, config=None, sources: dict[str, str] | None = None,
                    normalization: tuple[bool, str] | None = None) -> str:
    """One console line: the preset, its values and why it was chosen; with the run's (resolved) ``config``,
    a value the run overrides reads ``expectile 0.5 (--expectile; the preset's 0.9)``, or names what set it
    where ``sources`` maps the field to it (``expectile 0.5 (the offline run's; the preset's 0.9)``);
    ``normalization`` (``(normalize, reason)``) adds whether observations are standardised, and why."""
    preset = PRESETS[name]

    swept = sweep_values(getattr(config, "sweep", None))

    def value(field: str) -> str:
        own = getattr(config, field, None)
        shown = SHOWN_NAMES.get(field, field)
        if field in swept:
            return f"{shown} {', '.join(f'{v:g}' for v in swept[field])} (--sweep; the preset's {getattr(preset, field)})"
        if own is None or own in ("auto", getattr(preset, field)):
            return f"{shown} {getattr(preset, field)}"
        return f"{shown} {own} ({(sources or {}).get(field, flag(field))}; the preset's {getattr(preset, field)})"

    def shown(field: str) -> bool:  # the target rate and the actor where the preset's or the run's is not the paper's
        if field not in ("tau", "actor"):
            return True
        paper, own = getattr(PRESETS["mujoco"], field), getattr(config, field, None)
        return getattr(preset, field) != paper or own not in (None, "auto", paper)

    # the loader's rule, as the run applies it (fine-tuning keeps it online too: jobs/online.SuccessTerminal)
    terminal = config.success_terminal_option() if config is not None else (None if preset.success_terminal else False)
    goal = ""
    if preset.success_terminal or terminal is not False:
        goal = {None: ", goal terminal where the goal is out of the input", True: ", goal terminal",
                False: ", goal continuing"}[terminal]
    parts = [value(field) for field in PRESET_FIELDS if shown(field)]
    episodes = getattr(config, "eval_episodes", None)  # where the preset's or the run's are not the usual 10
    if episodes not in (None, preset.eval_episodes):
        parts.append(f"evaluation episodes {episodes} (--eval-episodes; the preset's {preset.eval_episodes})")
    elif preset.eval_episodes != Preset.eval_episodes:
        parts.append(f"evaluation episodes {preset.eval_episodes}")
    line = f"preset {name} ({', '.join(parts)}{goal}): {reason}"
    return line if normalization is None else f"{line}; {describe_normalization(*normalization)}"


# Settings that do not shape what a run learns: a resumed run may change them.
RUN_NEUTRAL_SETTINGS = (
    "logger", "progress", "threads", "eval_episodes", "log_every", "checkpoint_every", "device", "output_dir", "resume",
)


class ConfigError(ValueError):
    """A setting out of its range, or a combination of settings that cannot run."""


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


@dataclass
class RunConfig:
    """Settings shared by offline training and fine-tuning."""

    # set when the settings are resolved (not a setting): the run chose how its step runs (--compile and
    # --cudagraphs auto), so a compiled step that disagrees with the eager step continues eager instead of stopping
    step_chosen = False

    dataset: str = DEFAULT_DATASET
    """Minari dataset id. Ids of the local builders (``python -m iql_torchrl.datasets list``) are built on first use."""
    batch_size: int = 256
    """Transitions per update (per process)."""
    seed: int = 0
    """Seed of the network initialisation, the batch draws and the evaluation episodes."""
    eval_every: int = 2_000
    """Evaluate every this many updates (and always at the end)."""
    eval_episodes: int | None = None
    """Episodes per evaluation, stepped in parallel. Default: the preset's (10; 100 on maze and antmaze)."""
    temperature: float | None = None
    """β, the AWR inverse temperature (0 is behaviour cloning). Default: the preset's."""
    expectile: float | None = None
    """τ, the value expectile, in (0, 1). Default: the preset's."""
    preset: Literal["auto", "mujoco", "hopper", "walker2d", "antmaze", "maze", "maze-continuing", "kitchen", "adroit"] = "auto"
    """The paper's per-domain τ, β, actor dropout and reward transform (hopper and walker2d: mujoco's with a
    deterministic actor and a target rate of 0.001, CORL's on hopper); auto follows the dataset id (D4RL/antmaze →
    antmaze, D4RL/pointmaze and the local mazes → maze, hopper → hopper, walker2d → walker2d, other mujoco and D4RL
    locomotion → mujoco, D4RL/kitchen → kitchen, Adroit → adroit; other goal data with one fixed evaluation goal →
    maze, anything else → mujoco)."""
    reward_transform: Literal["auto", "locomotion", "antmaze", "none"] = "auto"
    """Rewards as training sees them: locomotion scales them by 1000 / (the spread of the episodes' returns), antmaze
    subtracts 1, none keeps them as stored; auto is the preset's."""
    goal_input: Literal["auto", "yes", "no"] = "auto"
    """Goal-reaching data: desired_goal in the policy's input (yes), or out with rewards relabelled to the
    evaluation's fixed goal (no); auto is the dataset's choice (out for the mazes)."""
    success_terminal: bool | Literal["auto"] = "auto"
    """Goal out of the input: the transitions that reach the fixed goal are terminal (D4RL AntMaze's convention; no
    value bootstraps past the goal). auto is the preset's choice (maze and antmaze: on wherever the goal is out of
    the input); --success-terminal / --no-success-terminal force it. Evaluation keeps the environment's own rules."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Training device; auto picks cuda when available."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the whole update step: auto does when the step can be compiled here and the run is long
    enough to repay the compilation; --compile / --no-compile force it."""
    cudagraphs: bool | Literal["auto"] = "auto"
    """Replay the compiled step as a CUDA graph (needs CUDA): auto does wherever the step compiles on CUDA (the
    fastest mode there); --cudagraphs / --no-cudagraphs force it."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Number format of the step's GEMMs: bf16 computes the wide (256×256) layers' in bfloat16 with float32
    accumulation, everything else float32; auto takes bf16 where the layers are 256 wide or more, the CPU has native bf16
    (AVX512_BF16 or AMX), the step compiles and a measurement on this host says it pays, fp32 elsewhere (CUDA included). --bf16: --precision bf16."""
    order: Literal["paper", "summed"] = "paper"
    """Update order: step V first, then the actor and Q with the new V (paper); or one summed backward."""
    logger: Literal["csv", "wandb", "tensorboard", "none"] = "csv"
    """TorchRL logger; wandb runs offline when no API key is set."""
    output_dir: Path | None = None
    """Run folder (checkpoint, logs, summary.json, curve PNG), owned by one process at a time. Default: a new folder under runs/."""
    resume: bool = False
    """Continue the run in --output-dir from its checkpoint, with the checkpoint's settings."""
    checkpoint_every: int = 5_000
    """Write the checkpoint every this many updates (and before every evaluation)."""
    log_every: int = 500
    """Read metrics to the host and log them every this many updates."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer widths of every network."""
    actor: Literal["auto", "gaussian", "deterministic"] = "auto"
    """The policy on Box actions: gaussian (the paper's, trained by advantage-weighted log-likelihood) or deterministic
    (tanh of an MLP, trained by advantage-weighted squared error to the dataset action: CORL's iql_deterministic, its
    setting on hopper medium and medium-replay); auto: the preset's (deterministic on hopper and walker2d, gaussian elsewhere).
    Discrete actions take a categorical actor."""
    lr: float = 3e-4
    """Learning rate of every network, unless set per network below."""
    actor_lr: float | None = None
    """Learning rate of the actor. Default: --lr."""
    qvalue_lr: float | None = None
    """Learning rate of the two critics Q(s, a) (the loss's qvalue network). Default: --lr."""
    value_lr: float | None = None
    """Learning rate of the value network. Default: --lr."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Optimizer of every network (adamw: decoupled weight decay)."""
    weight_decay: float = 0.0
    """Weight decay of every optimizer (>= 0)."""
    tau: float | None = None
    """Soft target update rate of the critics, in (0, 1]. Default: the preset's (0.005; 0.001 on hopper and walker2d)."""
    gamma: float = 0.99
    """Discount, in [0, 1]."""
    normalize_observations: Literal["auto", "yes", "no"] = "auto"
    """Standardise observations, (obs − mean) / (std + 1e-3) with the dataset's per-feature statistics, in the data,
    the evaluation and online environments and the saved and exported policy (the statistics kept in the checkpoint).
    auto: yes on MuJoCo locomotion data (Hopper, Walker2d, HalfCheetah, Ant, Humanoid, Swimmer), as CORL's IQL; no
    elsewhere."""
    clip_actions: bool = False
    """Clip dataset actions outside the environment's bounds into them (with a warning) instead of refusing the data."""
    progress: bool = True
    """Show the progress bar."""
    threads: int | Literal["auto"] = "auto"
    """CPU threads of torch: a number, or auto (this process's share of the CPUs it may run on; one for a
    compiled bf16 step where its GEMMs measure faster on one)."""

    def __post_init__(self):
        # True and False read as yes and no (a Python caller's, a checkpoint's)
        if isinstance(self.normalize_observations, bool):
            self.normalize_observations = "yes" if self.normalize_observations else "no"

    def resolved(self):
        """A copy with the preset's values filled in and the device chosen."""
        import torch

        name, _ = preset_choice(self)
        preset = PRESETS[name]
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return replace(
            self,
            temperature=preset.temperature if self.temperature is None else self.temperature,
            expectile=preset.expectile if self.expectile is None else self.expectile,
            reward_transform=preset.reward_transform if self.reward_transform == "auto" else self.reward_transform,
            tau=preset.tau if self.tau is None else self.tau,
            actor=self.actor_choice(),
            preset=name,
            normalize_observations="yes" if normalization_choice(self)[0] else "no",
            eval_episodes=preset.eval_episodes if self.eval_episodes is None else self.eval_episodes,
            device=device,
            hidden_sizes=tuple(self.hidden_sizes),
        )

    def total_updates(self) -> int:
        """Gradient updates the run makes (what --compile auto weighs against the compilation)."""
        raise NotImplementedError

    @property
    def actor_dropout(self) -> float:
        """The actor's dropout: the (resolved) preset's (0.1 on kitchen and adroit, as in the paper)."""
        return PRESETS[self.preset].actor_dropout

    def actor_choice(self) -> str:
        """The actor asked for on Box actions: ``--actor`` as given, else the preset's."""
        return self.actor if self.actor != "auto" else PRESETS[preset_choice(self)[0]].actor

    def actor_kind(self, metadata) -> str:
        """The actor :func:`~iql_torchrl.make_iql_networks` builds for data described by ``metadata``; :class:`ConfigError`
        for a deterministic actor on discrete actions."""
        self.check_actor(metadata.discrete)
        return "deterministic" if self.actor_choice() == "deterministic" else metadata.actor_kind

    def check_actor(self, discrete: bool | None) -> None:
        """:class:`ConfigError` for a deterministic actor (``--actor deterministic`` or the preset's) on discrete
        actions (``discrete``: whether the data's actions are, ``None`` while that is not known)."""
        if self.actor_choice() == "deterministic" and discrete:
            if self.actor == "deterministic":
                raise ConfigError(f"--actor deterministic: {self.dataset} has discrete actions, which take a "
                                  "categorical actor; leave out --actor.")
            name = preset_choice(self)[0]
            raise ConfigError(f"--preset {name}: its actor is deterministic, and {self.dataset} has discrete actions, "
                              "which take a categorical actor; choose another --preset.")

    def goal_in_observation(self) -> bool | None:
        """``--goal-input`` as the data loader's ``goal_in_observation`` (``None``: the dataset's choice)."""
        return {"auto": None, "yes": True, "no": False}[self.goal_input]

    def success_terminal_option(self) -> bool | None:
        """``--success-terminal`` as the data loader's ``success_terminal``: as given, else the preset's rule
        (``None``: terminal wherever the rewards were relabelled to a fixed goal)."""
        if self.success_terminal != "auto":
            return self.success_terminal
        return None if PRESETS[preset_choice(self)[0]].success_terminal else False

    def optimizer_settings(self) -> dict:
        """The keyword arguments of :class:`~iql_torchrl.IQLUpdate` for the optimisers, where they differ from its defaults."""
        settings = dict(actor_lr=self.actor_lr, qvalue_lr=self.qvalue_lr, value_lr=self.value_lr,
                        optimizer=self.optimizer, weight_decay=self.weight_decay)
        defaults = dict(actor_lr=None, qvalue_lr=None, value_lr=None, optimizer="adam", weight_decay=0.0)
        return {name: value for name, value in settings.items() if value != defaults[name]}

    def check(self) -> None:
        """Raises :class:`ConfigError` naming the first setting out of its range."""
        need = self._need
        problem = dataset_id_problem(self.dataset)
        if problem is not None:
            raise ConfigError(f"{flag('dataset')} {self.dataset}: {problem}.")
        problem = logger_problem(self.logger)
        if problem is not None:
            raise ConfigError(f"{flag('logger')} {self.logger}: {problem}.")
        self.check_integers(1, "batch_size", "eval_every", "checkpoint_every", "log_every")
        if self.eval_episodes is not None:
            self.check_integers(1, "eval_episodes")
        need(len(self.hidden_sizes) >= 1 and all(_is_int(h) and h >= 1 for h in self.hidden_sizes),
             "hidden_sizes", "one or more layer widths, each >= 1")
        if self.temperature is not None:
            need(is_finite_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0 (0 is behaviour cloning)")
        if self.expectile is not None:
            need(is_finite_number(self.expectile) and 0 < self.expectile < 1, "expectile", "in (0, 1), e.g. 0.7")
        problem = optimizer_settings_problem({name: getattr(self, name) for name in (
            "lr", "actor_lr", "qvalue_lr", "value_lr", "weight_decay", "tau")})
        if problem is not None:
            need(False, *problem)
        need(is_finite_number(self.gamma) and 0 <= self.gamma <= 1, "gamma", "in [0, 1], e.g. 0.99")
        need(self.normalize_observations in ("auto", "yes", "no"), "normalize_observations", "auto, yes or no")
        need(self.actor in ("auto", "gaussian", "deterministic"), "actor", "auto, gaussian or deterministic")
        need(self.success_terminal is True or self.success_terminal is False or self.success_terminal == "auto",
             "success_terminal", "True, False or auto")
        need(self.threads == "auto" or (_is_int(self.threads) and self.threads >= 1), "threads", "auto or an integer >= 1")
        if self.resume and self.output_dir is None:
            raise ConfigError("--resume needs --output-dir: the run folder to continue.")

    def check_integers(self, minimum: int, *names: str) -> None:
        """Raises :class:`ConfigError` for the first of ``names`` that is not an integer >= ``minimum``
        (``True`` is no integer here)."""
        for name in names:
            self._need(_is_int(getattr(self, name)) and getattr(self, name) >= minimum, name, f"an integer >= {minimum}")

    def _need(self, ok: bool, name: str, valid: str) -> None:
        if not ok:
            raise ConfigError(f"{flag(name)} {_shown(getattr(self, name))}: must be {valid}.")


@dataclass
class OfflineConfig(RunConfig):
    """Offline IQL on a Minari dataset."""

    steps: int = 10_000
    """Gradient steps (each updates V, the actor and both critics). The paper runs 1M on D4RL."""
    num_seeds: int = 1
    """Train seeds seed … seed+K−1 at once, vmapped in one process; results per seed and mean ± std."""
    sweep: tuple[str, ...] | None = None
    """Train a grid of settings at once, each with every seed of --num-seeds, on the same batches: NAME=V1,V2,...
    entries (temperature, expectile), e.g. --sweep temperature=0,3,6 expectile=0.5,0.7; results per setting (mean ± std
    over seeds of the final and the best evaluation) and per member in summary.json (docs/scaling.md)."""

    def total_updates(self) -> int:
        return self.steps

    def resolved(self):
        """:meth:`RunConfig.resolved`; a swept setting has no one value (``None``): its members' are the sweep's."""
        return replace(super().resolved(), **{name: None for name in swept_names(self.sweep)})

    def check(self) -> None:
        super().check()
        self.check_integers(1, "steps", "num_seeds")
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.num_seeds > 1 and torchrun:
            raise ConfigError("--num-seeds cannot be combined with torchrun: run the seeds in one process, or one seed per run.")
        problem = sweep_problem(self.sweep)
        if problem is not None:
            raise ConfigError(f"{problem}.")
        if self.sweep is not None and torchrun:
            raise ConfigError("--sweep cannot be combined with torchrun: run the sweep in one process, or one setting per run.")
        for name in swept_names(self.sweep):
            if getattr(self, name) is not None:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} and --sweep {name}=... both set {name}: "
                                  f"drop {flag(name)} (the sweep gives each member its {name}), or drop {name} "
                                  "from --sweep.")


def logger_problem(logger: str) -> str | None:
    """Why ``--logger`` cannot log here (a package it needs is missing), or ``None``."""
    if logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return "needs the tensorboard package: pip install 'iql_torchrl[tensorboard]'"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def conflicting_flags(given: set[str], wanted: dict, fixed: dict, source: str, agrees=None) -> list[str]:
    """``  --flag: <source> A, given B`` for each field set on purpose (``given``) whose value in ``wanted``
    differs from the one ``fixed`` holds (both as :func:`config_to_dict` writes them); ``agrees(name, value)``
    names given values that match whatever is fixed (e.g. auto)."""
    return [f"  {flag(name)}: {source} {_shown(fixed[name])}, given {_shown(wanted[name])}"
            for name in sorted(given & set(fixed) & set(wanted))
            if wanted[name] != fixed[name] and not (agrees and agrees(name, wanted[name]))]


# ---------------------------------------------------------------------------------------- saving and the CLI
def config_to_dict(config) -> dict:
    """The config as plain JSON data (paths as strings, tuples as lists), as checkpoints store it."""
    return json.loads(json.dumps(asdict(config), default=str))


def config_from_dict(config_cls, saved: dict):
    """The config a checkpoint stored; fields added since then keep their defaults."""
    names = {f.name for f in fields(config_cls)}
    config = config_cls(**{k: v for k, v in saved.items() if k in names})
    config.hidden_sizes = tuple(config.hidden_sizes)
    if config.output_dir is not None:
        config.output_dir = Path(config.output_dir)
    return config


def given_fields(config, argv: list[str] | None = None) -> set[str]:
    """The fields set on purpose: those named on the command line ``argv``, and those that differ from the default."""
    defaults = type(config)()
    given = {f.name for f in fields(config) if _plain(getattr(config, f.name)) != _plain(getattr(defaults, f.name))}
    for arg in argv or ():
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            for candidate in (name, name[3:] if name.startswith("no_") else None):
                if candidate in {f.name for f in fields(config)}:
                    given.add(candidate)
    return given


def _plain(value):
    return json.loads(json.dumps(value, default=str))


# settings that are True, False or "auto", and whose bare flag forces them: --compile, --no-compile, --success-terminal …
AUTO_FLAGS = ("compile", "cudagraphs", "success_terminal")
# settings that are auto, yes or no, whose bare flag forces them too: --normalize-observations, --no-normalize-observations
YES_NO_FLAGS = ("normalize_observations",)


def forced_flags(argv: list[str]) -> list[str]:
    """``argv`` with each bare ``--X`` / ``--no-X`` of :data:`AUTO_FLAGS` spelled ``--X=True`` / ``--X=False`` (of
    :data:`YES_NO_FLAGS`: ``--X=yes`` / ``--X=no``), and ``--bf16`` spelled ``--precision=bf16``."""
    out = ["--precision=bf16" if arg == "--bf16" else arg for arg in argv]
    for i, arg in enumerate(argv):
        for name in AUTO_FLAGS + YES_NO_FLAGS:
            option = f"--{name.replace('_', '-')}"
            on, off = ("yes", "no") if name in YES_NO_FLAGS else ("True", "False")
            value_follows = i + 1 < len(argv) and argv[i + 1] in (on, off, "auto")
            if arg == option and not value_follows:
                out[i] = f"{option}={on}"
            elif arg == f"--no-{option[2:]}":
                out[i] = f"{option}={off}"
    return out


def parse_cli(config_cls, argv: list[str] | None = None):
    """``(config, given)``: the config from the command line, and the fields set on purpose (see :func:`given_fields`)."""
    import tyro

    argv = forced_flags(sys.argv[1:] if argv is None else argv)
    parsed = tyro.cli(_with_field_help(config_cls), args=argv)
    config = config_cls(**{f.name: getattr(parsed, f.name) for f in fields(config_cls)})
    return config, given_fields(config, argv)


def field_help(config_cls) -> dict[str, str]:
    """Each field's docstring as ``--help`` shows it: a paragraph a line, without reST's double backquotes (a
    subclass's docstring wins)."""
    import docstring_parser

    docs = {}
    for cls in reversed(config_cls.__mro__[:-1]):
        for param in docstring_parser.parse_from_object(cls).params:
            if param.description:
                paragraphs = inspect.cleandoc(param.description).split("\n\n")
                docs[param.arg_name] = "\n\n".join(" ".join(p.replace("``", "").split()) for p in paragraphs)
    return docs


def _with_field_help(config_cls):
    # tyro keeps every line break of a field docstring that docstring_parser returns indented (tyro 1.0.17):
    # the same fields with their help given explicitly, in a subclass that only tyro sees
    import tyro

    hints, docs = typing.get_type_hints(config_cls), field_help(config_cls)
    annotated = [(f.name, Annotated[hints[f.name], tyro.conf.arg(help=docs[f.name])] if f.name in docs else hints[f.name],
                  field(default=f.default) if f.default is not MISSING else field(default_factory=f.default_factory))
                 for f in fields(config_cls)]
    return make_dataclass(config_cls.__name__, annotated, bases=(config_cls,), namespace={"__doc__": config_cls.__doc__})
