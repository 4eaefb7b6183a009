"""A pytest plugin (``-p cpu_without_bf16``, benchmarks/ on the path) for benchmarks/bench_tiers.py: the processes it
loads in see a CPU without native bf16, so ``--precision auto`` and the tests choose as they do on an AVX2-only host.
The package asks the CPU itself (:func:`~iql_torchrl.precision_choice.native_bf16`), whatever
``ATEN_CPU_CAPABILITY`` says; that answer is replaced in those processes only."""
import iql_torchrl.precision_choice as precision_choice

precision_choice.native_bf16 = lambda: None
