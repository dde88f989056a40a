"""What a benchmark ran on, for its JSON: the CPU's model and the instruction sets that move our figures.

Why: `platform.processor()` says only "x86_64", and this project's machines change vendor between
sessions (an Intel Xeon with AMX, an AMD EPYC without): AMX and AVX-512 BF16/VNNI decide the bf16 and
int8 speeds, so a figure without them cannot be compared with another.
"""

from __future__ import annotations

import platform
from pathlib import Path

#: the /proc/cpuinfo flags that change bf16 and int8 kernel speed
SPEED_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_name() -> str:
    """"<model name> [flags]" from /proc/cpuinfo where there is one, else platform's word."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    present = [f for f in SPEED_FLAGS if f in flags]
    return f"{fields.get('model name', platform.machine())} [{' '.join(present)}]"
