"""A second run takes its compiled step from torch's own caches, and never code made for another vector width."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# a compiled step and its eager twin take three updates; what torch's caches did, and how far apart they end
SCRIPT = f"""
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
    twins.append((loss, IQLUpdate(loss, data=data, total_steps=10, mode=mode, eager_checks=0)))
for step in range(3):
    for loss, update in twins:
        update(torch.arange(32) + 32 * step)
(eager, _), (compiled, update) = twins
print(json.dumps({{"gap": max((a - b).abs().max().item() for a, b in zip(eager.parameters(), compiled.parameters())),
                  "compilations": update.compilations, "fx": dict(counters["inductor"]),
                  "autograd": dict(counters["aot_autograd"])}}))
"""


def run(cache, **env):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_run_takes_the_step_from_torch_s_caches_and_another_vector_width_compiles_its_own(tmp_path):
    first, second = run(tmp_path), run(tmp_path)
    assert first["fx"].get("fxgraph_cache_miss") == 1 and first["autograd"].get("autograd_cache_miss") == 1
    assert second["fx"].get("fxgraph_cache_hit") == 1 and second["autograd"].get("autograd_cache_hit") == 1
    assert "fxgraph_cache_miss" not in second["fx"]  # the wrong variant: compiled again in full
    for out in (first, second):
        assert out["compilations"] == 1 and out["gap"] < 1e-5, out
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return
    # code generated for 16-float vectors, served to a process using 8-float ones, computes wrong values or aborts
    # (docs/performance.md): that process compiles its own
    narrow = run(tmp_path, ATEN_CPU_CAPABILITY="avx2")
    assert narrow["fx"].get("fxgraph_cache_miss") == 1 and "fxgraph_cache_hit" not in narrow["fx"], narrow
    assert narrow["compilations"] == 1 and narrow["gap"] < 1e-5, narrow
