"""A pytest plugin (``-p cpu_without_bf16``, benchmarks/ on the path) for benchmarks/bench_tiers.py: the processes it
loads in see a CPU without native bf16, so ``--precision auto`` and the tests choose as they do on an AVX2-only host.
torch answers the question from the CPU itself, whatever ``ATEN_CPU_CAPABILITY`` says; its two checks are
replaced in those processes only."""
import torch

torch.cpu._is_amx_tile_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
