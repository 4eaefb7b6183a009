"""precision="bf16": the wide layers' GEMMs in bfloat16, everything else float32; "auto" takes it only where it pays.

Expected values are built from float64 products of bf16-rounded operands; the wrong variants are the float32
product (a layer the mode missed) and a run on other batches (the scale of seed noise).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import iql_torchrl.precision_choice as precision
from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks
from iql_torchrl.objectives.ensemble import SeedEnsemble
from iql_torchrl.runs.config import OfflineConfig, parse_cli
from iql_torchrl.runs.resume import ResumeError
from iql_torchrl.runs.settings import resolve_precision
from iql_torchrl.precision_choice import choose_precision
from iql_torchrl.step.precision import BF16Layers, BiasApart
from iql_offline import train
from synthetic import random_transitions

# several tests here step bf16 eagerly on purpose, which warns that eager bf16 is the slower choice
pytestmark = pytest.mark.filterwarnings("ignore:IQLUpdate.precision='bf16'.. the eager step runs slower")

# eager bf16 GEMMs are emulated on a CPU without native bf16 (AVX2 only), where a test that trains in them takes
# minutes (bf16-learns), or a compiled bf16 step with its eager check (alone or in a job) half a minute: the slow
# tier's there
slow_where_bf16_is_emulated = pytest.mark.slow if precision.native_bf16() is None else (lambda test: test)

BF16_ULP = 2.0**-7  # the spacing of bf16 numbers in [1, 2): 8 significant bits


def _bf16(t):
    return t.to(torch.bfloat16).double()


def test_a_wide_linear_layer_is_the_bf16_product_of_bf16_operands_accumulated_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    x = torch.randn(128, 64)
    with BF16Layers():
        got = layer(x).double()
    exact = (_bf16(x) @ _bf16(layer.weight).T).to(torch.bfloat16).double() + layer.bias.double()
    fp32 = (x.double() @ layer.weight.double().T) + layer.bias.double()
    scale = exact.abs().clamp(min=1e-3)
    # the GEMM accumulates in float32 and rounds once to bf16: at most one bf16 step off the exact product
    assert ((got - exact).abs() / scale).max() <= BF16_ULP
    assert ((got - exact).abs() / scale).mean() < 1e-3
    # a float32 layer is ~0.2% off it on average: the mode is what makes the difference
    assert ((fp32 - exact).abs() / scale).mean() > 2e-3
    assert got.dtype == torch.float64 and layer(x).dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 256), (12, 256), (256, 23)])
def test_thin_layers_stay_float32_bit_for_bit(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    x = torch.randn(32, shape[1])
    with BF16Layers():
        got = layer(x)
    assert torch.equal(got, layer(x))
    with BF16Layers(min_features=1):  # every layer, as bf16 autocast would
        assert not torch.equal(layer(x), got)


def test_gradients_reach_the_float32_weights_through_the_bf16_product():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    x = torch.randn(256, 64)
    with BF16Layers():
        layer(x).square().sum().backward()
    bf16_grad = layer.weight.grad.clone()
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert bf16_grad.dtype == torch.float32
    relative = (bf16_grad - layer.weight.grad).norm() / layer.weight.grad.norm()
    assert 1e-4 < relative < 2e-2  # bf16 rounding (0.4% per factor), not a different gradient


def test_a_linear_layer_with_its_bias_apart_computes_the_same_sum():
    torch.manual_seed(0)
    layer, no_bias = nn.Linear(17, 32).double(), nn.Linear(17, 32, bias=False).double()
    x = torch.randn(64, 17, dtype=torch.float64)
    with BiasApart():
        got, got_no_bias = layer(x), no_bias(x)
    assert torch.equal(got, x @ layer.weight.T + layer.bias)  # x - (-b) is x + b, bit for bit
    assert not torch.allclose(got, x @ layer.weight.T - layer.bias)  # the sign's wrong variant
    assert torch.equal(got_no_bias, x @ no_bias.weight.T)


def test_compiled_on_the_cpu_the_bias_apart_leaves_inductor_no_addmm():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer, x = nn.Linear(32, 32), torch.randn(16, 32)

    def apart(x):
        with BiasApart():
            return torch.relu(layer(x))

    out, code = run_and_get_code(torch.compile(apart, fullgraph=True), x)
    assert "addmm" not in "".join(code) and torch.allclose(out, torch.relu(layer(x)), rtol=1e-6, atol=1e-6)
    # the plain layer is what the mode is for: inductor folds its bias into addmm (a copy of the bias per row)
    _, code = run_and_get_code(torch.compile(lambda x: torch.relu(layer(x)), fullgraph=True), x)
    assert "addmm" in "".join(code)


def test_the_stacked_critics_plain_path_rounds_as_their_own_linear_layers_do():
    torch.manual_seed(0)
    loss = IQLLoss(*make_iql_networks(5, 3, hidden_sizes=(64, 64)))
    batch = random_transitions(128, 5, 3)
    assert loss.plain_qvalue is not None
    params = loss.qvalue_network_params
    with BF16Layers():
        stacked = loss.plain_qvalue(params, batch)  # batched matmuls
        one_by_one = torch.stack([_critic(loss, params[k], batch) for k in range(2)])  # nn.Linear layers
    fp32 = torch.stack([_critic(loss, params[k], batch) for k in range(2)])
    assert torch.allclose(stacked, one_by_one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stacked, fp32, rtol=1e-5, atol=1e-6)


def _critic(loss, params, batch):
    with params.to_module(loss.qvalue_network):
        return loss.qvalue_network(batch.select(*loss.qvalue_network.in_keys).clone())["state_action_value"]


# ------------------------------------------------------------------ the step
def _job_loss(seed=0):
    torch.manual_seed(seed)
    return IQLLoss(*make_iql_networks(17, 6))  # the default job's 2×256 networks


def _run(precision_name, batches, mode="eager"):
    loss = _job_loss()
    update = IQLUpdate(loss, precision=precision_name, mode=mode, total_steps=len(batches))
    losses = [update(b) for b in batches]
    return loss, torch.stack([torch.stack([m[k] for k in ("loss_value", "loss_qvalue", "loss_actor")]) for m in losses])


def _flat(loss):
    return torch.cat([p.detach().flatten() for p in loss.parameters()])


@slow_where_bf16_is_emulated
def test_bf16_learns_what_fp32_learns_within_less_than_seed_noise():
    # 300 updates at the default job's shapes (2×256, B 256). A bf16 GEMM rounds each product to 8 significant
    # bits (0.2% on average); through Adam, whose first steps turn near-zero gradients into ±lr moves whatever
    # their rounding, that spreads into the trained parameters -- but far less than drawing other batches does.
    data = random_transitions(4096, 17, 6, seed=1)
    g = torch.Generator().manual_seed(0)
    draw = lambda: [data[torch.randint(0, 4096, (256,), generator=g)] for _ in range(300)]
    batches, other_batches = draw(), draw()
    start = _flat(_job_loss())
    loss_32, curve_32 = _run("fp32", batches)
    loss_16, curve_16 = _run("bf16", batches)
    loss_other, curve_other = _run("fp32", other_batches)
    trained = (_flat(loss_32) - start).norm()
    drift = (_flat(loss_16) - _flat(loss_32)).norm() / trained
    noise = (_flat(loss_other) - _flat(loss_32)).norm() / trained
    assert drift < 0.25 * noise, (drift, noise)
    assert all(p.dtype == torch.float32 for p in loss_16.parameters())
    last_32, last_16, last_other = (c[-50:].mean(0) for c in (curve_32, curve_16, curve_other))
    assert torch.allclose(last_16, last_32, rtol=0.03), (last_16, last_32)
    assert not torch.allclose(curve_16, curve_32)  # bf16 did run
    assert (last_16 - last_32).abs().max() < 0.5 * (last_other - last_32).abs().max()


@slow_where_bf16_is_emulated
def test_the_compiled_bf16_step_passes_its_eager_check_and_agrees_with_eager():
    batches = [random_transitions(256, 17, 6, seed=s) for s in range(6)]
    loss_c, curve_c = _run("bf16", batches, mode="compile")
    loss_e, curve_e = _run("bf16", batches)
    rms = ((_flat(loss_c) - _flat(loss_e)).square().mean().sqrt() / 3e-4).item()
    assert rms < 0.3, rms  # the eager check's bound under bf16
    assert torch.allclose(curve_c, curve_e, rtol=1e-2)


def test_vmapped_seeds_take_bf16_too():
    data = random_transitions(1024, 17, 6)
    indices = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("fp32", "bf16"):
        ensemble = SeedEnsemble([_job_loss(1), _job_loss(2)])
        out[name] = IQLUpdate(ensemble, precision=name, data=data)(indices)["loss_qvalue"]
    assert out["bf16"].shape == (2,)
    assert torch.allclose(out["bf16"], out["fp32"], rtol=0.02) and not torch.equal(out["bf16"], out["fp32"])


# ------------------------------------------------------------------ auto, and a forced bf16 that costs
@pytest.fixture
def host(monkeypatch):
    """Pretends a CPU: its native bf16 instructions and what the wide layer's probe measures."""
    def pretend(native, speedup, alone=1.0):
        """``speedup``: bf16 over fp32 on the process's threads; ``alone``: bf16 on one thread over bf16 on them."""
        monkeypatch.setattr(precision, "native_bf16", lambda: native)
        monkeypatch.setattr(precision, "bf16_speedup",  # on one thread: what the step checks once a run took it
                            lambda *args, **kwargs: speedup * alone if torch.get_num_threads() == 1 else speedup)
        monkeypatch.setattr(precision, "one_thread_speedup", lambda *args, **kwargs: alone)
    return pretend


def test_auto_takes_bf16_only_with_native_bf16_a_compiled_step_and_a_measured_gain(host):
    host("AMX", 1.8)
    chosen, why, threads = choose_precision("cpu", True, (256, 256))
    assert chosen == "bf16" and "AMX" in why and "1.80×" in why and threads is None
    assert choose_precision("cpu", False, (256, 256))[0] == "fp32"  # eager
    assert choose_precision("cuda", True, (256, 256))[0] == "fp32"
    assert choose_precision("cpu", True, None)[0] == "fp32"  # no wide layer
    host("AMX", 0.8)
    chosen, why, _ = choose_precision("cpu", True, (256, 256))
    assert chosen == "fp32" and "0.80×" in why
    host(None, 5.0)
    chosen, why, _ = choose_precision("cpu", True, (256, 256), may_take_one_thread=True)
    assert chosen == "fp32" and "no native bf16" in why


def test_auto_keeps_fp32_for_layers_narrower_than_those_bf16_was_measured_to_learn_with(host):
    host("AMX", 5.0, alone=2.5)  # however much faster bf16 would be
    for layer in ((64, 64), (256, 64), (128, 128)):
        chosen, why, _ = choose_precision("cpu", True, layer, may_take_one_thread=True)
        assert chosen == "fp32" and f"{layer[0]}×{layer[1]}" in why and "256×256" in why, layer
    assert choose_precision("cpu", True, (256, 300))[0] == "bf16"
    config = OfflineConfig(device="cpu", compile=True, hidden_sizes=(64, 64))
    resolve_precision(config, IQLLoss(*make_iql_networks(17, 6, hidden_sizes=(64, 64))))
    assert config.precision == "fp32"


def test_auto_takes_one_thread_where_the_bf16_gemms_run_faster_there(host, two_threads):
    # measured on an AMX host at GOMP_SPINCOUNT=1000: 0.8× in bf16 on 2 threads, 2.4× faster on one
    host("AMX", 0.8, alone=2.5)
    chosen, why, threads = choose_precision("cpu", True, (256, 256), may_take_one_thread=True)
    assert (chosen, threads) == ("bf16", 1) and "2.00× faster in bf16 on one thread than in fp32" in why
    assert choose_precision("cpu", True, (256, 256)) == ("fp32", choose_precision("cpu", True, (256, 256)).reason, None)
    assert choose_precision("cpu", False, (256, 256), may_take_one_thread=True).threads is None  # eager
    host("AMX", 2.0, alone=1.4)  # three vmapped seeds measured 1.25×, and their job ran 0.9× on one thread
    assert choose_precision("cpu", True, (256, 256), may_take_one_thread=True)[::2] == ("bf16", None)
    host("AMX", 0.5, alone=2.0)  # faster on one thread, but no faster than fp32 on all
    assert choose_precision("cpu", True, (256, 256), may_take_one_thread=True)[::2] == ("fp32", None)


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)


def test_the_run_takes_one_thread_only_where_its_threads_are_its_own(host, two_threads, monkeypatch, capsys):
    host("AMX", 0.8, alone=2.5)
    config = OfflineConfig(device="cpu", compile=True)
    resolve_precision(config, _job_loss())
    assert config.precision == "bf16" and torch.get_num_threads() == 1
    assert "computes in bf16 on one thread: this CPU has AMX" in capsys.readouterr().err

    settings = [dict(threads=2), dict(compile=False), dict(precision="fp32")]
    for setting in settings:  # a thread count asked for, an eager step, fp32 asked for: the threads stay
        torch.set_num_threads(2)
        resolve_precision(OfflineConfig(device="cpu", **{"compile": True, **setting}), _job_loss())
        assert torch.get_num_threads() == 2, setting
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own count
    config = OfflineConfig(device="cpu", compile=True)
    resolve_precision(config, _job_loss())
    assert (config.precision, torch.get_num_threads()) == ("fp32", 2)
    monkeypatch.delenv("OMP_NUM_THREADS")

    config = OfflineConfig(device="cpu", compile=True, precision="bf16")  # a forced bf16 takes it too
    resolve_precision(config, _job_loss())
    assert torch.get_num_threads() == 1 and "the bf16 step runs on one thread" in capsys.readouterr().err
    torch.set_num_threads(2)
    host("AMX", 2.0, alone=1.4)
    resolve_precision(OfflineConfig(device="cpu", compile=True, precision="bf16"), _job_loss())
    assert torch.get_num_threads() == 2


@slow_where_bf16_is_emulated
def test_a_run_on_one_thread_says_so_in_its_summary(host, two_threads, tiny_datasets, tmp_path):
    host("AMX", 0.8, alone=2.5)
    summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "run", steps=2,
                                  eval_every=2, eval_episodes=1, hidden_sizes=(256, 256), batch_size=16,
                                  logger="none", progress=False, compile=True, device="cpu"))
    assert (summary["precision"], summary["threads"]) == ("bf16", 1)


def test_the_probe_times_the_threads_it_is_asked_for_and_gives_torch_its_own_back(two_threads):
    fp32, bf16 = precision._layer_times(64, 64, 32, 1, threads=1, rounds=1, calls=1)
    assert fp32 > 0 and bf16 > 0 and torch.get_num_threads() == 2


def test_a_forced_bf16_that_is_slower_here_says_what_it_costs(host):
    host(None, 0.1)
    with pytest.warns(UserWarning, match=r"10\.0× slower than fp32 on this CPU"):
        update = IQLUpdate(_job_loss(), precision="bf16", mode="compile")
    assert update.precision == "bf16"
    host("AMX", 2.0)  # the GEMMs pay, the eager step does not
    with pytest.warns(UserWarning, match="the eager step runs slower in bf16"):
        IQLUpdate(_job_loss(), precision="bf16")
    host("AMX", 2.0)
    update = IQLUpdate(_job_loss(), precision="auto", mode="compile")
    assert update.precision == "bf16" and "AMX" in update.precision_reason
    with pytest.raises(ValueError, match="precision must be one of"):
        IQLUpdate(_job_loss(), precision="fp16")


def test_auto_probes_the_layer_as_the_step_batches_it_k_seeds_at_once(monkeypatch, capsys):
    # a vmapped SeedEnsemble computes each layer of its K seeds in one batched GEMM, which keeps both threads
    # busy: measured 2.5× for 3 seeds where one seed's layer measured 0.8× (AMX host, GOMP_SPINCOUNT=1000)
    monkeypatch.setattr(precision, "native_bf16", lambda: "AMX")
    monkeypatch.setattr(precision, "bf16_speedup", lambda out, inp, batch, stacked=1: 2.5 if stacked == 3 else 0.8)
    monkeypatch.setattr(precision, "one_thread_speedup", lambda *args, **kwargs: 1.0)  # not this host's measurement
    chosen = {}
    for seeds in (1, 3):
        config = OfflineConfig(device="cpu", compile=True, num_seeds=seeds)
        resolve_precision(config, SeedEnsemble([_job_loss(k) for k in range(seeds)]) if seeds > 1 else _job_loss())
        chosen[seeds] = config.precision
    assert chosen == {1: "fp32", 3: "bf16"}
    assert "(×3 seeds)" in capsys.readouterr().err
    ensemble = SeedEnsemble([_job_loss(1), _job_loss(2), _job_loss(3)])
    assert IQLUpdate(ensemble, precision="auto", mode="compile").precision == "bf16"


def test_auto_reads_the_layers_of_the_networks_built_not_the_hidden_sizes(host):
    host("AMX", 2.0)  # one hidden layer of 256 on 300 observations: its input layer, 256×300, is the wide one
    loss = IQLLoss(*make_iql_networks(300, 6, hidden_sizes=(256,)))
    config = OfflineConfig(device="cpu", compile=True, hidden_sizes=(256,))
    resolve_precision(config, loss)
    assert config.precision == "bf16"
    config = OfflineConfig(device="cpu", compile=True, hidden_sizes=(256,))
    resolve_precision(config, IQLLoss(*make_iql_networks(3, 1, hidden_sizes=(256,))))  # 256×3, 1×256: none
    assert config.precision == "fp32"


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--bf16"], "bf16"), (["--precision", "fp32"], "fp32")])
def test_the_precision_flag_and_its_bf16_alias(argv, expected):
    config, given = parse_cli(OfflineConfig, argv)
    assert config.precision == expected and ("precision" in given) == bool(argv)


@slow_where_bf16_is_emulated
def test_the_run_resolves_auto_once_says_why_and_a_resume_keeps_it(
        host, tiny_datasets, tmp_path, capsys, stop_after_checkpoint):
    host("AMX", 2.0)
    config = OfflineConfig(device="cpu", compile=True)
    resolve_precision(config, _job_loss())
    assert config.precision == "bf16" and "computes in bf16: this CPU has AMX" in capsys.readouterr().err
    out = tmp_path / "run"
    stop_after_checkpoint(lambda run: run.step == 2)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, steps=4, eval_every=4, eval_episodes=1,
                            checkpoint_every=2, hidden_sizes=(256, 256), batch_size=16, logger="none", progress=False,
                            log_every=2, compile=True, device="cpu"))
    stop_after_checkpoint(None)
    host(None, 0.5)  # resumed on a host without native bf16: the checkpoint's precision stands, auto included
    with pytest.warns(UserWarning, match="slower than fp32"):
        summary = train(OfflineConfig(output_dir=out, resume=True, precision="auto", progress=False))
    assert summary["precision"] == "bf16"
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16"


def test_a_resume_goes_on_in_the_precision_asked_for_and_says_so(capsys):
    # a bf16 run moved to a CPU without native bf16 would go on emulated: --precision fp32 continues it in fp32
    from iql_torchrl.runs.config import config_to_dict
    from iql_torchrl.runs.resume import resumed_config

    saved = config_to_dict(OfflineConfig(dataset="iql_torchrl/pendulum/mixed-v0", output_dir="/tmp/x",
                                         precision="bf16", temperature=5.0).resolved())
    again = lambda **given: OfflineConfig(dataset="iql_torchrl/pendulum/mixed-v0", output_dir="/tmp/x", resume=True,
                                          **given)
    assert resumed_config(OfflineConfig, saved, again(precision="fp32"), {"precision"}).precision == "fp32"
    assert "--precision fp32: the run goes on in fp32 (its checkpoint's step ran in bf16)" in capsys.readouterr().err
    for precision in ("auto", "bf16"):  # the checkpoint's, quietly
        assert resumed_config(OfflineConfig, saved, again(precision=precision), {"precision"}).precision == "bf16"
    assert capsys.readouterr().err == ""
    with pytest.raises(ResumeError, match="--temperature: checkpoint 5.0, given 3.0"):  # the run's shape still may not
        resumed_config(OfflineConfig, saved, again(precision="fp32", temperature=3.0), {"precision", "temperature"})
