"""The update steps that ``bench_update.py`` times, each one call per update on a sampled batch.

* TorchRL: its own ``torchrl.objectives.IQLLoss``, updated as TorchRL's
  ``sota-implementations/iql`` script updates it (the three losses summed, one ``backward()``,
  its three ``torch.optim.Adam`` grouped with ``group_optimizers``, ``SoftUpdate``); compiled as
  that script compiles it (``torch.compile(update, mode="reduce-overhead")``).
* iql_torchrl: :class:`~iql_torchrl.IQLUpdate`.
* the GEMM limit: the matrix multiplications one paper-order ``IQLUpdate`` step performs (forward
  and backward, as recorded from the step itself: shapes, strides, batched critics), replayed
  back to back: what the step would cost with zero overhead besides its GEMMs.

Both implementations get the same networks (``make_iql_networks``, same seed) and the paper's
hyperparameters: expectile 0.7, temperature 3, L2 critic loss, γ 0.99, τ 0.005, Adam 3e-4.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch.utils._python_dispatch import TorchDispatchMode
from torchrl.objectives import IQLLoss as TorchRLIQLLoss
from torchrl.objectives import SoftUpdate, group_optimizers

from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks
from iql_torchrl.precision_choice import MIN_FEATURES

PAPER = {"expectile": 0.7, "temperature": 3.0, "gamma": 0.99, "tau": 0.005, "lr": 3e-4}
GEMM_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default)


@dataclass
class Setup:
    batch_size: int = 256
    obs_dim: int = 17
    action_dim: int = 6
    hidden: int = 256
    layers: int = 2
    device: str = "cpu"

    @property
    def hidden_sizes(self):
        return (self.hidden,) * self.layers


@dataclass
class Steps:
    """``step(batch)`` is what is timed; ``plain`` the uncompiled function of a compiled step
    (what ``torch._dynamo.explain`` traces), ``None`` for an eager one."""

    step: Callable
    plain: Callable | None = None


def make_batch(setup: Setup, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    b, o, a = setup.batch_size, setup.obs_dim, setup.action_dim
    return TensorDict(
        {
            "observation": torch.randn(b, o, generator=g),
            "action": torch.rand(b, a, generator=g) * 1.8 - 0.9,
            ("next", "observation"): torch.randn(b, o, generator=g),
            ("next", "reward"): torch.randn(b, 1, generator=g),
            ("next", "terminated"): torch.rand(b, 1, generator=g) < 0.01,
            ("next", "done"): torch.rand(b, 1, generator=g) < 0.01,
        },
        [b],
        device=setup.device,
    )


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_networks(setup: Setup):
    torch.manual_seed(0)  # the same initial weights for every variant
    return make_iql_networks(setup.obs_dim, setup.action_dim, hidden_sizes=setup.hidden_sizes)


# ------------------------------------------------------------------------------------- TorchRL
def torchrl_steps(setup: Setup, mode: str) -> Steps:
    """TorchRL's IQLLoss step as its offline IQL script writes it: eager, compiled, or compiled and replayed by
    tensordict's ``CudaGraphModule`` (``mode="cudagraphs"``: the script's ``compile.cudagraphs``, its fastest on a GPU)."""
    actor, critics, value = make_networks(setup)
    loss = TorchRLIQLLoss(
        actor, critics, value,
        loss_function="l2", temperature=PAPER["temperature"], expectile=PAPER["expectile"],
    ).to(setup.device)
    loss.make_value_estimator(gamma=PAPER["gamma"], device=setup.device)
    target_updater = SoftUpdate(loss, tau=PAPER["tau"])
    optimizer = group_optimizers(*(
        torch.optim.Adam(list(getattr(loss, f"{name}_network_params").flatten_keys().values()), lr=PAPER["lr"])
        for name in ("actor", "qvalue", "value")
    ))

    def update(data):
        optimizer.zero_grad(set_to_none=True)
        out = loss(data)
        (out["loss_actor"] + out["loss_value"] + out["loss_qvalue"]).backward()
        optimizer.step()
        target_updater.step()
        return out.detach()

    if mode == "eager":
        return Steps(update)
    if mode == "cudagraphs":  # the script's compile.cudagraphs path: compiled (default mode), then tensordict's graph
        from tensordict.nn import CudaGraphModule

        graphed = CudaGraphModule(torch.compile(update), in_keys=[], out_keys=[], warmup=5)  # graphs: torchrl-compile's
        batch_keys = []

        def replay(data):
            # the script samples a fresh batch each update; the bench reuses one, into which TorchRL's actor writes
            # entries that require grad, which CudaGraphModule refuses as inputs: the batch's own entries only
            batch_keys[:] = batch_keys or list(data.keys(True, True))
            return graphed(data.select(*batch_keys))

        return Steps(replay)
    compiled = torch.compile(update, mode="reduce-overhead")
    on_cuda = str(setup.device).startswith("cuda")

    def step(data):
        if on_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(data)

    return Steps(step, update)


# ------------------------------------------------------------------------------------- ours
def make_iql_update(setup: Setup, mode: str, order: str, precision: str = "fp32",
                    min_features: int = MIN_FEATURES, data: TensorDict | None = None) -> IQLUpdate:
    """``data``: the step takes indices into it, as the main job's does."""
    loss = IQLLoss(*make_networks(setup), temperature=PAPER["temperature"], expectile=PAPER["expectile"])
    loss.make_value_estimator(gamma=PAPER["gamma"])
    return IQLUpdate(
        loss.to(setup.device), total_steps=10**9, lr=PAPER["lr"], tau=PAPER["tau"], mode=mode, order=order,
        precision=precision, bf16_min_features=min_features, data=data,
    )


def iql_steps(setup: Setup, mode: str, order: str, bf16_min_features: int | None = None) -> Steps:
    """``bf16_min_features``: bf16 GEMMs for the layers at least this wide in both dims (``None``: float32)."""
    precision = "fp32" if bf16_min_features is None else "bf16"
    update = make_iql_update(setup, mode, order, precision, bf16_min_features or MIN_FEATURES)
    return Steps(update, None if mode == "eager" else update.step_function)


# ------------------------------------------------------------------------------------- the limit
class _GemmRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMM_OPS:
            self.calls.append((func, [_layout(a) for a in args], kwargs))
        return func(*args, **kwargs)


@dataclass(frozen=True)
class TensorLayout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def random(self, device) -> torch.Tensor:
        """A random tensor of this shape and these strides (stride-0 broadcasts included)."""
        storage = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        return torch.randn(storage, device=device).to(self.dtype).as_strided(self.shape, self.stride)


def _layout(arg):
    return TensorLayout(tuple(arg.shape), tuple(arg.stride()), arg.dtype) if torch.is_tensor(arg) else arg


def recorded_gemms(setup: Setup) -> list[tuple]:
    """(op, argument layouts, kwargs) of every GEMM of one eager paper-order IQLUpdate step."""
    update = make_iql_update(setup, "eager", "paper")
    batch = make_batch(setup)
    update(batch)  # outside the recording: nothing built on a first call is counted
    recorder = _GemmRecorder()
    with recorder:
        update(batch)
    return recorder.calls


def gemm_flops(calls) -> int:
    """2 × multiply-adds of the recorded GEMMs (the bias that addmm/baddbmm add not counted)."""
    total = 0
    for func, layouts, _ in calls:
        with_input = func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default)
        a, b = layouts[1:3] if with_input else layouts[:2]
        *batch, m, k = a.shape
        total += 2 * m * k * b.shape[-1] * (batch[0] if batch else 1)
    return total


def gemm_steps(setup: Setup, calls) -> Steps:
    """The recorded GEMMs back to back, on operands built once: the step's GEMM-only time."""
    replay = [
        (func, [a.random(setup.device) if isinstance(a, TensorLayout) else a for a in layouts], kwargs)
        for func, layouts, kwargs in calls
    ]

    def step(_batch):
        for func, args, kwargs in replay:
            func(*args, **kwargs)

    return Steps(step)
