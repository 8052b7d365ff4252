"""How much CPU other processes took while a benchmark ran (Linux /proc/stat), so CPU timings taken on a
shared machine say that they are unreliable.

On a 2-core machine, torch's two OpenMP threads and one busy neighbour make every parallel region wait for
a descheduled thread: the same warm-up took 9-12 s alone and 27-266 s beside other test suites (the
`nanoflow` command therefore sets OMP_WAIT_POLICY=PASSIVE on CPU-only hosts).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CONTENDED_FRACTION = 0.10
"""Other processes' share of all CPUs above which a CPU timing is flagged as unreliable."""


def _busy_seconds(stat: str | Path = "/proc/stat") -> float | None:
    """CPU seconds all processes spent running (user, nice, system, irq, softirq, steal), or None."""
    try:
        first = Path(stat).read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu" or len(first) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class HostLoad:
    """CPU use during one measured region."""

    wall_s: float
    """Wall time of the region."""
    own_cpu_s: float
    """CPU seconds of this process (all its threads)."""
    other_cpu_s: float
    """CPU seconds of every other process."""
    num_cpus: int
    """CPUs of this machine."""

    @property
    def other_fraction(self) -> float:
        """Other processes' share of all CPUs over the region."""
        return self.other_cpu_s / max(self.wall_s * self.num_cpus, 1e-9)

    @property
    def contended(self) -> bool:
        return self.other_fraction > CONTENDED_FRACTION

    def to_dict(self) -> dict:
        return {"wall_s": self.wall_s, "own_cpu_s": self.own_cpu_s, "other_cpu_s": self.other_cpu_s,
                "num_cpus": self.num_cpus, "other_fraction": self.other_fraction, "contended": self.contended}

    def warning(self, what: str) -> str | None:
        if not self.contended:
            return None
        return (f"other processes used {100 * self.other_fraction:.0f}% of the {self.num_cpus} CPUs during "
                f"the {what}: CPU timings on a shared machine are unreliable (run it alone)")


class HostLoadMeter:
    """with HostLoadMeter() as meter: ...; meter.result is a HostLoad (None where /proc/stat is absent)."""

    def __enter__(self) -> "HostLoadMeter":
        self.result: HostLoad | None = None
        self.wall_s = 0.0
        self._busy = _busy_seconds()
        self._times = os.times()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = self.wall_s = time.perf_counter() - self._t0
        busy = _busy_seconds()
        if self._busy is None or busy is None:
            return
        t = os.times()
        own = (t.user - self._times.user) + (t.system - self._times.system)
        self.result = HostLoad(wall_s=wall, own_cpu_s=own, other_cpu_s=max(busy - self._busy - own, 0.0),
                               num_cpus=os.cpu_count() or 1)
