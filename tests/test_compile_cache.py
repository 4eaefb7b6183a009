"""The compiled-step cache trusts only entries its own key signed, and never breaks a run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from torch_features import AHEAD_OF_TIME, CACHED_STEPS

from iql_torchrl.step.compile_cache import CompiledStepCache, default_cache_folder, entry_key
from iql_torchrl.step.wiring import compiled_step_description


class FakeCompiled:
    """Stands for an AOTCompiledFunction: what store() serialises, and the modules its trace went through."""

    def __init__(self, payload: bytes, traced_modules=()):
        self.payload, self.traced_modules = payload, traced_modules

    @classmethod
    def serialize(cls, fn, external_data=None):
        return SimpleNamespace(serialized_data=fn.payload)

    def source_info(self):
        return SimpleNamespace(inlined_sources=[SimpleNamespace(module=name) for name in self.traced_modules])

    def __call__(self, owner, x):  # as a compiled step is called: with its owner
        return owner.step(x)

    def disable_guard_check(self):
        pass


def loaded_payloads(monkeypatch):
    seen = []
    monkeypatch.setattr("torch.compiler.load_compiled_function", lambda f, f_globals, external_data: seen.append(f.read()) or "step")
    return seen


def test_an_entry_it_signed_loads(tmp_path, monkeypatch):
    seen = loaded_payloads(monkeypatch)
    cache = CompiledStepCache(tmp_path)
    cache.store("k", FakeCompiled(b"compiled bytes"), [["value", "self.tau"]], [0.5])
    assert cache.load("k", {}) == ("step", [["value", "self.tau"]], [0.5]) and seen == [b"compiled bytes"]
    assert (tmp_path / "secret.key").stat().st_mode & 0o077 == 0  # the key is its owner's alone


def test_an_entry_traced_through_a_file_loads_while_the_file_is_unchanged_imported_or_not(tmp_path, monkeypatch):
    # a step traced through a module of the user's; a later run may load the entry before it imports that module
    import importlib

    loaded_payloads(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_lazy_helpers.py").write_text("SCALE = 2.0\n")
    importlib.import_module("user_lazy_helpers")
    cache = CompiledStepCache(tmp_path / "cache")
    cache.store("k", FakeCompiled(b"compiled bytes", ["user_lazy_helpers", "torch.nn.modules.linear"]), [], [])
    assert cache.load("k", {}) is not None
    monkeypatch.delitem(sys.modules, "user_lazy_helpers")  # a new run, not imported yet: read where it was found
    assert cache.load("k", {}) is not None
    (tmp_path / "user_lazy_helpers.py").write_text("SCALE = 3.0\n")
    assert cache.load("k", {}) is None
    importlib.import_module("user_lazy_helpers")  # and imported, edited
    assert cache.load("k", {}) is None
    (tmp_path / "user_lazy_helpers.py").write_text("SCALE = 2.0\n")  # back as the trace saw it
    assert cache.load("k", {}) is not None


@pytest.mark.parametrize("damage", ["flip a payload byte", "truncate", "foreign key"])
def test_a_damaged_or_foreign_entry_is_removed_not_loaded(tmp_path, monkeypatch, damage):
    seen = loaded_payloads(monkeypatch)
    cache = CompiledStepCache(tmp_path / "mine")
    cache.store("k", FakeCompiled(b"compiled bytes" * 10), [], [])
    entry = cache.path("k")
    if damage == "flip a payload byte":
        data = bytearray(entry.read_bytes())
        data[-1] ^= 1
        entry.write_bytes(bytes(data))
    elif damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:20])
    else:  # an entry another cache (another user, another machine) wrote, copied in
        other = CompiledStepCache(tmp_path / "theirs")
        other.store("k", FakeCompiled(b"their bytes"), [], [])
        shutil.copy(other.path("k"), entry)
    with pytest.warns(UserWarning, match="compiled anew"):
        assert cache.load("k", {}) is None
    assert seen == [] and not entry.exists()


def test_an_entry_torch_cannot_load_is_removed(tmp_path, monkeypatch):
    def refuse(f, f_globals, external_data):
        raise RuntimeError("incompatible")
    monkeypatch.setattr("torch.compiler.load_compiled_function", refuse)
    cache = CompiledStepCache(tmp_path)
    cache.store("k", FakeCompiled(b"bytes"), [], [])
    with pytest.warns(UserWarning, match="could not load it"):
        assert cache.load("k", {}) is None
    assert not cache.path("k").exists()


def test_a_failed_write_warns_and_leaves_nothing(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not be cached"):
        CompiledStepCache(blocked / "cache").store("k", FakeCompiled(b"bytes"), [], [])


def test_two_runs_starting_at_once_on_a_new_folder_keep_both_entries(tmp_path, monkeypatch, recwarn):
    # two runs (e.g. seeds launched side by side) store their first entries at once, each creating the folder's
    # key; the key's bytes take a while to come (as from a slow disk): neither run may read it half written
    import secrets
    import threading
    import time

    seen = loaded_payloads(monkeypatch)
    real = secrets.token_bytes
    monkeypatch.setattr(secrets, "token_bytes", lambda n: time.sleep(0.2) or real(n))
    start = threading.Barrier(2)

    def run(key):
        start.wait()
        CompiledStepCache(tmp_path).store(key, FakeCompiled(key.encode()), [], [])

    threads = [threading.Thread(target=run, args=(key,)) for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache = CompiledStepCache(tmp_path)
    assert cache.load("a", {}) == ("step", [], []) and cache.load("b", {}) == ("step", [], [])
    assert sorted(seen) == [b"a", b"b"] and not [str(w.message) for w in recwarn]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.step", "b.step", "secret.key"]  # no key left half made


class Doubler:
    """A step's owner, as IQLUpdate is: its step doubles the input."""

    def step(self, x):
        return 2 * x


def compiling_slowly(monkeypatch, compiled: list):
    """Runners of Doubler.step whose ahead-of-time compilation takes a while and is counted in ``compiled``;
    their cache's entries load as FakeCompiled."""
    import time

    from iql_torchrl.step.modes import StepRunner

    monkeypatch.setattr("torch.compiler.load_compiled_function",
                        lambda f, f_globals, external_data: FakeCompiled(f.read()))

    def aot_compile(example):
        time.sleep(1.0)
        compiled.append(example)
        return FakeCompiled(b"doubled")

    def runner(cache):
        runner = StepRunner(Doubler().step, mode="compile", ahead_of_time=True, cache=cache,
                            description=lambda: {"step": "double"})
        runner.unguarded = SimpleNamespace(aot_compile=aot_compile)
        return runner

    return runner


@CACHED_STEPS
def test_runs_starting_the_same_step_at_once_compile_it_once(tmp_path, monkeypatch):
    # seeds launched side by side as separate runs: the first compiles, the others wait and load its entry
    import threading

    compiled = []
    make_runner = compiling_slowly(monkeypatch, compiled)
    runners = [make_runner(CompiledStepCache(tmp_path)) for _ in range(3)]
    outputs, start = [None] * 3, threading.Barrier(3)

    def run(i):
        start.wait()
        outputs[i] = runners[i](torch.ones(2))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(compiled) == 1 and [r.compilations for r in runners] == [1, 1, 1]
    assert all(torch.equal(out, torch.full((2,), 2.0)) for out in outputs)


@CACHED_STEPS
def test_a_run_waits_for_another_compiling_the_same_step_only_so_long(tmp_path, monkeypatch):
    # a run whose lock holder seems stuck (paused, in a debugger) compiles the step itself after the cache's wait
    import threading
    import time

    compiled = []
    make_runner = compiling_slowly(monkeypatch, compiled)
    first = threading.Thread(target=make_runner(CompiledStepCache(tmp_path)), args=(torch.ones(2),))
    first.start()
    time.sleep(0.2)  # the first run holds the lock, compiling
    with pytest.warns(UserWarning, match="compiling it here too"):
        out = make_runner(CompiledStepCache(tmp_path, wait=0.1))(torch.ones(2))
    first.join()
    assert len(compiled) == 2 and torch.equal(out, torch.full((2,), 2.0))


def test_the_key_follows_every_setting():
    base = {"tau": 0.005, "signature": "(256, 3)"}
    assert entry_key(base) == entry_key(dict(base))
    assert entry_key(base) != entry_key({**base, "tau": 0.01})
    assert entry_key(base) != entry_key({**base, "signature": "(128, 3)"})
    threads, key = torch.get_num_threads(), entry_key(base)  # the compiled kernels' parallel regions are sized for them
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert entry_key(base) != key
    finally:
        torch.set_num_threads(threads)


def test_the_key_follows_the_code_a_step_traces_beyond_the_step_itself(monkeypatch):
    # the loss's equations (a module of the package outside step/) and TorchRL's and tensordict's code: an upgrade
    # of any of them must not load a step compiled from the old code
    import importlib.metadata

    import iql_torchrl.objectives.equations as equations
    import iql_torchrl.step.compile_cache as compile_cache

    base = {"tau": 0.005, "signature": "(256, 3)"}
    key = entry_key(base)
    changed, read_bytes = Path(equations.__file__).resolve(), Path.read_bytes
    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_bytes", lambda path: read_bytes(path) + (b"# edited" if path.resolve() == changed else b""))
        assert entry_key(base) != key
    version = importlib.metadata.version
    for upgraded in ("torchrl", "tensordict", "torch"):
        with monkeypatch.context() as patch:
            patch.setattr(compile_cache.importlib.metadata, "version",
                          lambda name: version(name) + ".post1" if name == upgraded else version(name))
            patch.setattr(torch, "__version__", torch.__version__ + (".post1" if upgraded == "torch" else ""))
            assert entry_key(base) != key, upgraded
    assert entry_key(base) == key


def test_a_process_on_other_vector_instructions_gets_its_own_entry():
    # inductor generates C++ for the vector width torch's kernels use (ATEN_CPU_CAPABILITY), and code made for one
    # width computes wrong values compiled for another: processes of two widths sharing a folder keep two entries
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no vector instructions torch uses")
    script = "from iql_torchrl.step.compile_cache import entry_key; print(entry_key({'tau': 0.005}))"

    def key(**env):
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()

    assert key() != key(ATEN_CPU_CAPABILITY="default")  # a second run's own key is tested by loading its entry


def test_the_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IQL_TORCHRL_COMPILE_CACHE", str(tmp_path))
    assert default_cache_folder() == tmp_path
    monkeypatch.setenv("IQL_TORCHRL_COMPILE_CACHE", "")
    assert default_cache_folder() is None
    monkeypatch.delenv("IQL_TORCHRL_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_folder() == tmp_path / "iql_torchrl" / "compiled-steps"


# ------------------------------------------------------------------ with IQLUpdate: compiled steps across runs
def _loss(seed: int = 0):
    # the value network as a user composes one: TorchRL's MLP inside a Sequential of their own (dynamo's code
    # around such a graph holds tensordict.utils' globals, which pickle alone refuses)
    import torch
    from torchrl.modules import MLP, ValueOperator

    from iql_torchrl import IQLLoss, make_iql_networks

    torch.manual_seed(seed)
    actor, critics, _ = make_iql_networks(3, 2, hidden_sizes=(16,))
    value = ValueOperator(torch.nn.Sequential(MLP(in_features=3, out_features=1, num_cells=[16]), torch.nn.Identity()),
                          in_keys=["observation"])
    return IQLLoss(actor, critics, value)


def _batch():
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import random_transitions

    return random_transitions(32, 3, 2)


def _assert_matches_eager(update_factory, steps: int = 3):
    import torch

    from iql_torchrl import IQLUpdate

    compiled_loss, eager_loss = _loss(), _loss()
    compiled, eager = update_factory(compiled_loss), IQLUpdate(eager_loss, mode="eager")
    batch = _batch()
    for _ in range(steps):
        compiled(batch.clone())
        eager(batch.clone())
    for p, q in zip(compiled_loss.parameters(), eager_loss.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    return compiled


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    """A cache holding the step of _loss() compiled once (by a run that then ends)."""
    if not AHEAD_OF_TIME:
        pytest.skip("this torch has no aot_compile (e.g. 2.11): its guarded step is never cached")
    from iql_torchrl import IQLUpdate

    folder = tmp_path_factory.mktemp("compiled-steps")
    IQLUpdate(_loss(), mode="compile", compile_cache=folder)(_batch())
    assert len(list(folder.glob("*.step"))) == 1
    return folder


def test_a_second_run_starts_from_the_cached_step_and_trains_as_eager(filled_cache):
    from iql_torchrl import IQLUpdate

    def from_cache(loss):
        update = IQLUpdate(loss, mode="compile", compile_cache=filled_cache)
        update.runner.unguarded = None  # compiling now would fail (and the suite turns that warning into an error)
        return update

    _assert_matches_eager(from_cache)


def test_a_loss_moved_with_to_loads_the_step_cached_for_one_that_was_not(filled_cache):
    # .to() / .double() only count in the loss for the misuse guard; the device and dtype they change are in the
    # call signature, so a loss moved to where it already was shares the entry
    from iql_torchrl import IQLUpdate

    def moved(loss):
        update = IQLUpdate(loss.to("cpu").float(), mode="compile", compile_cache=filled_cache)
        update.runner.unguarded = None  # compiling now would fail (and the suite turns that warning into an error)
        return update

    _assert_matches_eager(moved)


@pytest.mark.slow
def test_a_tampered_entry_is_compiled_anew(filled_cache, tmp_path):
    from iql_torchrl import IQLUpdate

    shutil.copytree(filled_cache, tmp_path / "cache")
    entry = next((tmp_path / "cache").glob("*.step"))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="compiled anew"):
        _assert_matches_eager(lambda loss: IQLUpdate(loss, mode="compile", compile_cache=tmp_path / "cache"))
    assert entry.read_bytes() != bytes(data)  # rewritten by the new compilation


@pytest.mark.parametrize("change", ["tau", "expectile", "hidden layer", "lr", "loss_function", "update subclass"])
def test_every_setting_the_graph_bakes_in_changes_the_entry(change):
    # τ and the learning rates are tensors the compiled step reads: one entry serves them all; what the
    # graph bakes in (the networks, the critic loss) changes the entry; the expectile, a tensor too,
    # changes it through the number the loss keeps beside it (a needless miss, never a wrong hit)
    from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks

    class ClippedUpdate(IQLUpdate):  # a user's own step: the gradients clipped before Adam
        def _optimizer_step(self, group, grads):
            super()._optimizer_step(group, [g.clamp(-1, 1) for g in grads])

    def key(loss=None, update_class=IQLUpdate, **kwargs):
        update = update_class(loss or _loss(), mode="eager", **kwargs)
        return entry_key(compiled_step_description(update))

    base = key()
    if change == "tau":
        assert key(tau=0.01) == base
    elif change == "lr":
        assert key(actor_lr=1e-4) == base
    elif change == "expectile":
        loss = _loss()
        loss.expectile = 0.9
        assert key(loss) != base
    elif change == "update subclass":  # it would load the base's step, and train without its clipping
        assert key(update_class=ClippedUpdate) != base
    elif change == "loss_function":
        loss = _loss()
        loss.loss_function = "l1"
        assert key(loss) != base
    else:
        actor, critics, value = make_iql_networks(3, 2, hidden_sizes=(17,))
        assert key(IQLLoss(actor, critics, value)) != base
    assert key() == base


@pytest.mark.slow
@CACHED_STEPS
def test_vmapped_seeds_are_cached_and_a_second_run_trains_as_eager_from_the_entry(tmp_path):
    # tensordict replaces a torch vmap helper that the compiled vmapped graph pickles by name: without
    # putting torch's own back while pickling, the entry is never written and every run of seeds compiles
    from iql_torchrl import IQLUpdate
    from iql_torchrl.objectives.ensemble import SeedEnsemble
    from synthetic import random_transitions

    data = random_transitions(64, 3, 2)
    indices = [torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    IQLUpdate(SeedEnsemble([_loss(1), _loss(2)]), mode="compile", compile_cache=tmp_path, data=data)(indices[0])
    assert len(list(tmp_path.glob("*.step"))) == 1

    loaded_loss, eager_loss = SeedEnsemble([_loss(1), _loss(2)]), SeedEnsemble([_loss(1), _loss(2)])
    loaded = IQLUpdate(loaded_loss, mode="compile", compile_cache=tmp_path, data=data)
    loaded.runner.unguarded = None  # compiling now would fail: the step must come from the entry
    eager = IQLUpdate(eager_loss, mode="eager", data=data)
    for batch in indices:
        loaded(batch)
        eager(batch)
    assert loaded.compilations == 1
    for p, q in zip(loaded_loss.parameters(), eager_loss.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@CACHED_STEPS
def test_a_step_whose_network_calls_code_in_another_file_is_compiled_anew_once_that_file_changed(tmp_path, monkeypatch):
    # the user's value network ends in a layer of theirs whose forward calls a helper from another of their files;
    # that file is edited between two runs (the network's class and its own file stay as they were)
    import importlib

    from torchrl.modules import ValueOperator

    from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks

    monkeypatch.syspath_prepend(str(tmp_path))
    helper = tmp_path / "user_value_helpers.py"
    helper.write_text("def shift(x):\n    return x + 5.0\n")
    import user_value_helpers

    class Shifted(torch.nn.Module):
        def forward(self, x):
            return user_value_helpers.shift(x)

    def loss():
        torch.manual_seed(0)
        actor, critics, _ = make_iql_networks(3, 2, hidden_sizes=(16,))
        net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1), Shifted())
        return IQLLoss(actor, critics, ValueOperator(net, in_keys=["observation"]))

    def trained(mode):
        trained_loss = loss()
        update = IQLUpdate(trained_loss, mode=mode, compile_cache=tmp_path / "cache", eager_checks=0)
        for _ in range(3):
            update(_batch())
        return trained_loss

    trained("compile")  # the first run: compiled and stored
    assert len(list((tmp_path / "cache").glob("*.step"))) == 1
    before = trained("eager")
    helper.write_text("def shift(x):\n    return x - 5.0\n")
    importlib.reload(user_value_helpers)
    # the second run (no eager check to stop a stale step): the step traced from the old helper is not loaded
    after, expected = trained("compile"), trained("eager")
    for p, q in zip(after.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the wrong variant: the old helper's step trains elsewhere
    assert any(not torch.allclose(p, q, rtol=1e-3, atol=1e-4) for p, q in zip(before.parameters(), expected.parameters()))


# the guarded compiled step (a gradient hook's, as torchrun's all-reduce makes it; torch's FX graph cache keeps its
# kernels, which it does not for a step compiled ahead of time) and its eager twin take three updates: how far apart
# they end, and what the FX graph cache did
_TWINS = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from torch._dynamo.utils import counters
from synthetic import random_transitions
from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks

data = random_transitions(256, 3, 2)
twins = []
for mode in ("eager", "compile"):
    torch.manual_seed(1)
    loss = IQLLoss(*make_iql_networks(3, 2, hidden_sizes=(16, 16)))
    twins.append((loss, IQLUpdate(loss, data=data, total_steps=10, mode=mode, eager_checks=0,
                                  grad_hook=lambda grads: grads)))
for step in range(3):
    for loss, update in twins:
        update(torch.arange(32) + 32 * step)
(eager, _), (compiled, update) = twins
print(json.dumps({{"gap": max((a - b).abs().max().item() for a, b in zip(eager.parameters(), compiled.parameters())),
                  "compilations": update.compilations, "fx": dict(counters["inductor"])}}))
"""


@pytest.mark.slow
def test_a_process_on_other_vector_instructions_sharing_torch_s_inductor_cache_compiles_its_own_kernels(tmp_path):
    # torch's FX graph cache does not key the vector width: C++ generated for 16-float vectors, served to a process
    # using 8-float ones, computes wrong values or aborts (docs/performance.md); the step names its width to inductor
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs an AVX-512 CPU to run a narrower width beside it")

    def twins(**env):
        done = subprocess.run([sys.executable, "-c", _TWINS], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), **env})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    native, narrow = twins(), twins(ATEN_CPU_CAPABILITY="avx2")
    assert native["fx"].get("fxgraph_cache_miss") == 1, native
    assert narrow["fx"].get("fxgraph_cache_miss") == 1 and "fxgraph_cache_hit" not in narrow["fx"], narrow
    for out in (native, narrow):
        assert out["compilations"] == 1 and out["gap"] < 1e-5, out
