"""The vector instruction sets the C++ extension's CPU kernels can be built for, and the CPU flags
(as /proc/cpuinfo names them) each one needs.

Shared by setup.py, which builds for the widest set the building CPU has, and by _extension.py,
which refuses a loaded build on a CPU without its set. Standard library only: setup.py loads this
file by its path, before the package can be imported.
"""
from __future__ import annotations

from typing import FrozenSet, Optional

# widest first
REQUIRED_CPU_FLAGS = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "generic": frozenset(),
}


def cpu_flags() -> Optional[FrozenSet[str]]:
    """This CPU's flags from /proc/cpuinfo, or None where that is not known (off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else frozenset(line.split(":", 1)[1].split())


def widest_supported(flags: FrozenSet[str]) -> str:
    """The widest instruction set whose flags are all in `flags`."""
    return next(name for name, needed in REQUIRED_CPU_FLAGS.items() if needed <= flags)


def missing_flags(simd: str) -> set:
    """The flags instruction set `simd` needs that this CPU lacks (none when its flags are unknown)."""
    flags = cpu_flags()
    return set() if flags is None else set(REQUIRED_CPU_FLAGS.get(simd, frozenset()) - flags)
