"""What a benchmark process costs the machine: CPU time and peak resident memory, its own and its children's.

Pure standard library (no torch): a worker process can import it without fixing its thread environment.
"""

from __future__ import annotations

import os
import resource
import sys


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children so far.

    On a shared machine, wall time overstates what a benchmark costs; CPU time over the thread count
    estimates its wall time on an otherwise idle machine.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _status_kib(pid: int | str, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB.

    For this process, Linux's VmHWM (per address space, so it starts afresh at exec). ru_maxrss is the
    fallback; on Linux it also counts the parent's pages a subprocess inherited before its exec, which
    is why child processes are measured with :class:`ChildRssSampler` instead.
    """
    if who == resource.RUSAGE_SELF:
        hwm = _status_kib("self", "VmHWM")
        if hwm is not None:
            return hwm / 1024
    scale = 1024**2 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss / scale


class ChildRssSampler:
    """Samples the peak RSS (VmHWM) of this process's descendants from /proc every `interval` seconds.

    A descendant's own high-water mark is read on every sample, so a peak is missed only if the process
    both reaches it and exits between two samples.
    """

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval = interval
        self.peaks: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _descendants(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        wanted, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in wanted}
            wanted |= frontier
        return sorted(wanted)

    def _sample(self) -> None:
        for pid in self._descendants():
            hwm = _status_kib(pid, "VmHWM")
            if hwm is None:
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm / 1024)
            if pid not in self.names:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        self.names[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace")[:200]
                except OSError:
                    pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ChildRssSampler:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max(self.peaks.values(), default=0.0)
