"""Which CPU a benchmark ran on, in one phrase: its model name and the vector and bf16 instructions that decide
our step's speed (hosts vary: AVX2-only, AVX-512, AVX-512 with AVX512_BF16 and AMX)."""
from __future__ import annotations

import platform

FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_name() -> str:
    """E.g. ``"Intel(R) Xeon(R) Processor: AMX, AVX512_BF16, AVX-512"``; the model name alone off Linux."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return name
    have = [label for flag, label in FLAGS if flag in flags]
    if "AVX-512" in have and "AVX2" in have:
        have.remove("AVX2")
    return f"{name}: {', '.join(have) or 'no AVX2'}"
