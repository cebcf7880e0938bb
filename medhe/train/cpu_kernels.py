"""Pin torch's CPU kernels to AVX2, so that `medhe train` gives the same weights on any x86-64 Linux machine.

ATen and oneDNN pick their vector kernels by the CPU, and an AVX-512 kernel sums in another order
than an AVX2 one: the same seeded run then drifts in the fifth digit of the weights (measured
2026-12-04 on an AVX-512 machine: PneumoniaMNIST weights within 3e-5 of the shipped ones, the same
ACC and AUC, its ReLU twin one image apart; Br35H's twin four). With both libraries held to AVX2,
which x86-64 servers have had since 2013, that machine reproduced the shipped weights bit for bit.
Both libraries read these variables once, when first used, so this must run before torch is
imported; the `medhe` command calls it first thing. A variable the caller set is left alone. The CPU's
flags are read from /proc/cpuinfo: elsewhere (macOS, Windows) nothing is pinned. Child processes
inherit the variables, which costs them nothing but AVX-512's speed.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _cpu_has_avx2() -> bool:
    """From /proc/cpuinfo (Linux); elsewhere unknown, so False: ATen trusts the variable and would
    run AVX2 instructions on a CPU without them."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "avx2" in line.split(":", 1)[-1].split() for line in cpuinfo.splitlines())


def pin_cpu_kernels() -> bool:
    """Set PINNED_KERNELS (where unset) if they can still take effect; True if torch will use them."""
    if "torch" in sys.modules or platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2():
        return False
    for name, value in PINNED_KERNELS.items():
        os.environ.setdefault(name, value)
    return all(os.environ[name] == value for name, value in PINNED_KERNELS.items())
