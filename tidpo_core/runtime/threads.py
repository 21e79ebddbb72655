"""How many threads each tidpo process gives torch, decided at start and re-decided while other processes run.

Alone, torch's defaults (one intra-op thread per visible core, OpenMP threads spinning between ops) are the
fastest setting; beside another busy process they are the slowest, because the two processes' threads outnumber
the cores and the spinning ones take the core the other needs. No static setting wins both, so every process
tidpo starts runs under this plan:

- a ceiling: the CPUs it may use (the fewer of its affinity mask and its cgroup CPU quota), shared equally among
  the processes of its launch (LOCAL_WORLD_SIZE); one thread for a model below SMALL_MODEL_PARAMETERS, whose ops
  are too small to split;
- below the ceiling, as many threads as other processes leave free (ThreadGovernor): between two forward passes
  it compares the busy time of this process's CPUs with its own CPU time and gives torch one thread fewer for
  each CPU the others keep busy, so alone it runs exactly as torch's defaults do;
- one inter-op thread (tidpo runs one model call at a time); OpenMP's wait policy left at its default.

``TIDPO_NUM_THREADS=N`` (or the `compute` resource's `num_threads`) fixes the intra-op count and turns the
adaptation off. ``thread_environment`` gives a child process its thread count; a value the user set
(OMP_NUM_THREADS, OMP_WAIT_POLICY, ...) is kept. The measurements behind these choices: docs/threads.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NUM_THREADS_ENV = "TIDPO_NUM_THREADS"
# Below this, one thread. Set below every model bench/bench_contention.py measured: the embedded model
# (1M parameters) and a 21M one both ran faster on 2 threads than on 1 on an idle 2-core machine.
SMALL_MODEL_PARAMETERS = 100_000
# How often the governor looks at the machine: a first look soon after the start (a process that starts
# beside a busy one should not oversubscribe it for long), then every LOOK_EVERY_S. /proc/stat counts in
# 10 ms ticks, so a shorter window would mostly measure its own rounding.
FIRST_LOOK_S = 0.25
LOOK_EVERY_S = 0.5
# Another process's CPU use below this (a mostly idle `dagster dev` or MLflow UI) takes no thread away.
IDLE_NEIGHBOUR_CPUS = 0.25


@dataclass(frozen=True)
class ThreadPlan:
    intra_op: int
    """torch.set_num_threads: threads inside one op (matmul, attention); the most the governor gives."""
    inter_op: int
    """torch.set_num_interop_threads: ops run at the same time (tidpo runs one at a time)."""
    reason: str
    """Why these numbers, for logs and run metadata."""
    adapts: bool = False
    """Whether the count drops below intra_op while other processes keep the CPUs busy (ThreadGovernor)."""

    def environment(self) -> dict[str, str]:
        """The variables a child process needs to start under this plan (OpenMP reads them at load)."""
        return {"OMP_NUM_THREADS": str(self.intra_op), "MKL_NUM_THREADS": str(self.intra_op)}


def cgroup_cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown (v2 ``cpu.max``, then v1)."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def _affinity() -> set[int]:
    return (
        set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    )


def available_cpus(affinity: set[int] | frozenset[int] | None = None, quota: float | None = None) -> int:
    """The CPUs this process may actually use: its affinity mask, capped by a CPU quota (rounded up), at least 1.

    Defaults read the running process (``os.sched_getaffinity``) and its cgroup."""
    if affinity is None:
        affinity = _affinity()
    if quota is None:
        quota = cgroup_cpu_quota()
    cpus = len(affinity) or 1
    if quota is not None and quota > 0:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def local_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many processes of one launch share this machine (LOCAL_WORLD_SIZE, set by torchrun and
    `accelerate launch`); 1 outside a launch or when unreadable."""
    value = (os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE", "")
    try:
        return max(1, int(value))
    except ValueError:
        return 1


def cpu_share(cpus: int, processes: int) -> int:
    """Each of `processes` processes' equal share of `cpus`, at least 1: N processes each taking every CPU
    would oversubscribe the machine N times."""
    return max(1, cpus // max(1, processes))


def requested_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """TIDPO_NUM_THREADS as a positive int; None when unset or empty; a clear error otherwise."""
    value = (os.environ if environ is None else environ).get(NUM_THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        raise ValueError(
            f"{NUM_THREADS_ENV}={value!r}: expected a positive whole number of threads"
        ) from None
    if count < 1:
        raise ValueError(f"{NUM_THREADS_ENV}={value!r}: expected a positive whole number of threads")
    return count


def decide_threads(cpus: int, model_parameters: int | None, requested: int | None = None) -> ThreadPlan:
    """The plan for a process with `cpus` usable CPUs running a model of `model_parameters` (None: not
    known yet, treated as large). `requested` (TIDPO_NUM_THREADS) wins when given, and is kept however busy
    the machine is.

    Sampling gets no count of its own: until December 2026 it ran one thread for models under 10M
    parameters, which bench_contention measured 6 % slower than two on the embedded model when both were
    timed in one process (separate processes had said anything from 0.86x to 1.12x); beside another
    process, the governor now gives the thread away anyway."""
    if requested is not None:
        return ThreadPlan(requested, 1, f"{NUM_THREADS_ENV}={requested}")
    if model_parameters is not None and model_parameters < SMALL_MODEL_PARAMETERS:
        return ThreadPlan(1, 1, f"small model ({model_parameters:,} parameters): one thread")
    size = "model size unknown" if model_parameters is None else f"{model_parameters:,} parameters"
    adapts = cpus > 1
    fewer = ", fewer while other processes keep CPUs busy" if adapts else ""
    return ThreadPlan(cpus, 1, f"{size}: one thread per available CPU ({cpus}){fewer}", adapts=adapts)


def plan_for(model_parameters: int | None = None) -> ThreadPlan:
    """The plan for this process now: its share of the CPUs (with the other processes of its launch), the
    model's size and TIDPO_NUM_THREADS."""
    return decide_threads(
        cpu_share(available_cpus(), local_processes()), model_parameters, requested_threads()
    )


def parameter_count(*models: object) -> int:
    """Parameters of the models together (anything with ``.parameters()``)."""
    return sum(p.numel() for model in models for p in model.parameters())  # type: ignore[attr-defined]


# --- adapting to the other processes --------------------------------------------------------------------


def threads_beside_others(ceiling: int, cpus: int, others_busy_cpus: float) -> int:
    """Intra-op threads that fit beside other processes that kept `others_busy_cpus` CPUs busy (an average
    over the last window) out of the `cpus` this process may use: one thread fewer per CPU they take, a CPU
    counted as taken once they use more than IDLE_NEIGHBOUR_CPUS of it; never more than `ceiling`, never 0."""
    taken = max(0, math.ceil(others_busy_cpus - IDLE_NEIGHBOUR_CPUS))
    return max(1, min(ceiling, cpus - taken))


# /proc/stat columns after the CPU's name: user nice system idle iowait irq softirq steal (guest time is
# already inside user). Busy means run by this machine's processes: user, nice, system, irq, softirq. Steal
# (time the VM's host gave another guest) is left out: it comes and goes with the host's other tenants, and
# counted as busy, a light steal of 10-20 % sent a process running alone to one thread for a sixth of its
# forward passes (docs/threads.md), where the defaults it must match keep both.
_BUSY_COLUMNS = (0, 1, 2, 5, 6)


def busy_cpu_seconds(proc_stat: str, cpus: Collection[int], ticks_per_second: int = 100) -> float:
    """CPU-seconds the listed CPUs have spent running this machine's processes, from the text of /proc/stat."""
    ticks = 0
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        columns = [int(v) for v in rest.split()]
        ticks += sum(columns[i] for i in _BUSY_COLUMNS if i < len(columns))
    return ticks / ticks_per_second


def cgroup_cpu_seconds(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPU-seconds the processes of this cgroup have used (v2 ``cpu.stat`` usage_usec, then v1 cpuacct.usage)."""
    with contextlib.suppress(OSError, ValueError):
        for line in (cgroup_root / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    with contextlib.suppress(OSError, ValueError):
        return int((cgroup_root / "cpuacct" / "cpuacct.usage").read_text()) / 1e9
    return None


def machine_busy_reader() -> Callable[[], float] | None:
    """A function giving the busy CPU-seconds of the CPUs this process competes for, or None where this
    system does not say (no /proc/stat: not Linux). Under a cgroup CPU quota the competition is the cgroup's
    own processes (the quota is this process's share whatever runs outside it), otherwise every process on
    the CPUs of this process's affinity mask."""
    affinity = _affinity()
    quota = cgroup_cpu_quota()
    if quota is not None and math.ceil(quota) < len(affinity):
        return cgroup_cpu_seconds if cgroup_cpu_seconds() is not None else None
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return lambda: busy_cpu_seconds(stat.read_text(), affinity, ticks)


@dataclass
class ThreadGovernor:
    """Gives torch as many intra-op threads as the CPUs other processes leave free, up to the plan's count.

    `look` is called between two model calls (threads_for hooks it to the model's forward), in the thread that
    runs the model: OpenMP's thread count belongs to the calling thread. It costs one clock read until a look
    is due. The readers are injected so the arithmetic can be tested without a machine."""

    ceiling: int
    cpus: int
    read_busy: Callable[[], float]
    read_own: Callable[[], float] = time.process_time
    clock: Callable[[], float] = time.monotonic
    set_threads: Callable[[int], None] = field(default=lambda n: _set_torch_threads(n))
    current: int = 0
    changes: int = 0
    _next_look: float = 0.0
    _last: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        self.current = self.current or self.ceiling
        now = self.clock()
        self._last = (now, self.read_busy(), self.read_own())
        self._next_look = now + FIRST_LOOK_S

    def look(self) -> int:
        """Re-decide the thread count if a look is due; the count in force."""
        now = self.clock()
        if now < self._next_look:
            return self.current
        busy, own = self.read_busy(), self.read_own()
        then, busy_then, own_then = self._last
        others = max(0.0, (busy - busy_then) - (own - own_then)) / max(now - then, 1e-9)
        self._last, self._next_look = (now, busy, own), now + LOOK_EVERY_S
        wanted = threads_beside_others(self.ceiling, self.cpus, others)
        if wanted != self.current:
            self.set_threads(wanted)
            self.current, self.changes = wanted, self.changes + 1
        return self.current


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def apply_plan(plan: ThreadPlan) -> None:
    """Set torch's thread counts for this process. The inter-op pool can be sized only before torch first
    uses it; later calls keep the size it has."""
    import torch

    torch.set_num_threads(plan.intra_op)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(plan.inter_op)


@contextlib.contextmanager
def threads_for(*models: object) -> Iterator[ThreadPlan]:
    """Run the block under the plan for `models` (on CPU): its thread count, lowered while
    other processes keep the CPUs busy (a ThreadGovernor looking before each forward pass of the first
    model); then restore torch's previous thread count."""
    import torch

    previous = torch.get_num_threads()
    on_cpu = all(next(iter(m.parameters())).device.type == "cpu" for m in models)  # type: ignore[attr-defined]
    plan = plan_for(parameter_count(*models)) if on_cpu else plan_for(None)
    torch.set_num_threads(plan.intra_op)
    hook, governor = None, None
    reader = machine_busy_reader() if on_cpu and plan.adapts and models else None
    if reader is not None:
        governor = ThreadGovernor(plan.intra_op, available_cpus(), reader)

        def look_before_forward(*_: object) -> None:  # a pre-hook's return value would replace the inputs
            if _innermost() is governor:  # a nested block (sampling inside an evaluation) governs itself
                governor.look()

        hook = models[0].register_forward_pre_hook(look_before_forward)  # type: ignore[attr-defined]
    stack = _governors()
    stack.append(governor)
    try:
        yield plan
    finally:
        stack.pop()
        if hook is not None:
            hook.remove()
        torch.set_num_threads(previous)


_local = threading.local()


def _governors() -> list[ThreadGovernor | None]:
    """This thread's open threads_for blocks, innermost last (None: a block whose count does not adapt)."""
    if not hasattr(_local, "governors"):
        _local.governors = []
    return _local.governors


def _innermost() -> ThreadGovernor | None:
    stack = _governors()
    return stack[-1] if stack else None


def thread_environment(
    model_parameters: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`base` (default: this process's environment) plus the plan's variables, for a child process; a
    value the user set (OMP_NUM_THREADS, ...) is kept. The child applies the plan for its own model again
    once it knows it (threads_for)."""
    env = dict(os.environ if base is None else base)
    plan = decide_threads(available_cpus(), model_parameters, requested_threads(env))
    return {**plan.environment(), **env}
