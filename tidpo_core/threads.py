"""How many threads each tidpo process gives torch and OpenMP: decided, not left to the defaults.

torch's default is one intra-op thread per core it can see, and OpenMP's threads spin while they wait for
work. On a machine that runs anything else (a second experiment, `dagster dev`, the MLflow UI, Dagster's
multiprocess executor), those spinning threads take the cores the other process needs, and a small model,
whose every op is tiny, spends its time in that synchronisation. bench/bench_contention.py measured, on
2 cores, the weights pass 6-21x and SFT steps 5x slower beside one identical process under those defaults.
So every process tidpo starts runs under this policy:

- the CPUs it may use are the fewer of its affinity mask and its cgroup CPU quota (a container limited to
  2 CPUs on a 64-core host sees 64 cores but gets 2);
- one intra-op thread per usable CPU (its equal share when a launch runs several processes on the machine:
  LOCAL_WORLD_SIZE), except for a toy model (under SMALL_MODEL_PARAMETERS, the tests'
  models), where ops are too small to split, and for token-by-token sampling of a small model (under
  SMALL_GENERATION_PARAMETERS), where one thread was 2.4x faster than two on the embedded model;
- one inter-op thread (tidpo runs one model call at a time);
- OpenMP's idle threads spin briefly, then sleep: ``GOMP_SPINCOUNT=1000`` (about 10 microseconds) with
  ``OMP_WAIT_POLICY=PASSIVE``, set when tidpo_core is imported, before torch loads OpenMP, unless the user
  set them. Measured on 2 cores beside an identical process (bench/bench_contention.py, "wait_settings"):
  sleeping at once (PASSIVE alone) kept the slowdown at 0.7-1.4x but cost 10-66 % alone, because waking
  a sleeping thread is slow (in a VM, an idle vCPU halts); a 1,000-spin wait cost -13 to +25 % alone and
  slowed 1.8-2.2x beside the twin (fair sharing: 2x); 10,000 spins and more were as fast as torch's
  defaults alone but 4.8-10x slower beside the twin.

``TIDPO_NUM_THREADS=N`` (or the `compute` resource's `num_threads` in Dagster) overrides the intra-op count.
The OpenMP runtime reads its environment once, when torch loads it: ``thread_environment`` gives the
variables for a child process (the launcher adds them), and ``make`` exports them for its own processes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

NUM_THREADS_ENV = "TIDPO_NUM_THREADS"
# Below this, one thread. Set below every model bench/bench_contention.py measured: the embedded model
# (1M parameters) and a 21M one both ran faster on 2 threads than on 1 on an idle 2-core machine.
SMALL_MODEL_PARAMETERS = 100_000
# Sampling runs one token at a time, so its ops stay tiny for longer: bench_contention's threads_by_size found
# one thread 2.4x faster than two on the embedded 1M-parameter model and 1.06x slower on a 21M one.
SMALL_GENERATION_PARAMETERS = 10_000_000
WAIT_POLICY = "PASSIVE"
SPIN_COUNT = "1000"
Workload = Literal["compute", "generate"]


@dataclass(frozen=True)
class ThreadPolicy:
    intra_op: int
    """torch.set_num_threads: threads inside one op (matmul, attention)."""
    inter_op: int
    """torch.set_num_interop_threads: ops run at the same time (tidpo runs one at a time)."""
    omp_wait_policy: str
    """OMP_WAIT_POLICY for processes started under this policy: PASSIVE sleeps while waiting."""
    spin_count: str
    """GOMP_SPINCOUNT: how many times an idle OpenMP thread spins before it sleeps (libgomp, torch's OpenMP)."""
    reason: str
    """Why these numbers, for logs and run metadata."""

    def environment(self) -> dict[str, str]:
        """The variables a child process needs to start under this policy (OpenMP reads them at load)."""
        return {
            "OMP_NUM_THREADS": str(self.intra_op),
            "MKL_NUM_THREADS": str(self.intra_op),
            "OMP_WAIT_POLICY": self.omp_wait_policy,
            "GOMP_SPINCOUNT": self.spin_count,
        }


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


def available_cpus(affinity: set[int] | frozenset[int] | None = None, quota: float | None = None) -> int:
    """The CPUs this process may actually use: its affinity mask, capped by a CPU quota (rounded up), at least 1.

    Defaults read the running process (``os.sched_getaffinity``) and its cgroup."""
    if affinity is None:
        affinity = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
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
        raise ValueError(f"{NUM_THREADS_ENV}={value!r}: expected a positive whole number of threads") from None
    if count < 1:
        raise ValueError(f"{NUM_THREADS_ENV}={value!r}: expected a positive whole number of threads")
    return count


def decide_threads(cpus: int, model_parameters: int | None, requested: int | None = None, workload: Workload = "compute") -> ThreadPolicy:
    """The policy for a process with `cpus` usable CPUs running a model of `model_parameters` (None: not
    known yet, treated as large) for `workload` (forward/backward passes, or token-by-token sampling).
    `requested` (TIDPO_NUM_THREADS) wins when given."""
    if requested is not None:
        return ThreadPolicy(requested, 1, WAIT_POLICY, SPIN_COUNT, f"{NUM_THREADS_ENV}={requested}")
    if model_parameters is not None and model_parameters < SMALL_MODEL_PARAMETERS:
        return ThreadPolicy(1, 1, WAIT_POLICY, SPIN_COUNT, f"small model ({model_parameters:,} parameters): one thread")
    if workload == "generate" and model_parameters is not None and model_parameters < SMALL_GENERATION_PARAMETERS:
        return ThreadPolicy(1, 1, WAIT_POLICY, SPIN_COUNT, f"sampling a small model ({model_parameters:,} parameters): one thread")
    size = "model size unknown" if model_parameters is None else f"{model_parameters:,} parameters"
    return ThreadPolicy(cpus, 1, WAIT_POLICY, SPIN_COUNT, f"{size}: one thread per available CPU ({cpus})")


def policy_for(model_parameters: int | None = None, workload: Workload = "compute") -> ThreadPolicy:
    """The policy for this process now: its share of the CPUs (with the other processes of its launch), the
    model's size, the workload and TIDPO_NUM_THREADS."""
    return decide_threads(cpu_share(available_cpus(), local_processes()), model_parameters, requested_threads(), workload)


def parameter_count(*models: object) -> int:
    """Parameters of the models together (anything with ``.parameters()``)."""
    return sum(p.numel() for model in models for p in model.parameters())  # type: ignore[attr-defined]


def apply_policy(policy: ThreadPolicy) -> None:
    """Set torch's thread counts for this process. The inter-op pool can be sized only before torch first
    uses it; later calls keep the size it has."""
    import torch

    torch.set_num_threads(policy.intra_op)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(policy.inter_op)


@contextlib.contextmanager
def threads_for(*models: object, workload: Workload = "compute") -> Iterator[ThreadPolicy]:
    """Run the block under the policy for `models` (on CPU) and `workload`, then restore torch's previous
    thread count."""
    import torch

    previous = torch.get_num_threads()
    on_cpu = all(next(iter(m.parameters())).device.type == "cpu" for m in models)  # type: ignore[attr-defined]
    policy = policy_for(parameter_count(*models), workload) if on_cpu else policy_for(None, workload)
    torch.set_num_threads(policy.intra_op)
    try:
        yield policy
    finally:
        torch.set_num_threads(previous)


def thread_environment(model_parameters: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) plus the policy's variables, for a child process; a
    value the user set (OMP_NUM_THREADS, OMP_WAIT_POLICY, ...) is kept. The child applies the policy for
    its own model again once it knows it (threads_for)."""
    env = dict(os.environ if base is None else base)
    policy = decide_threads(available_cpus(), model_parameters, requested_threads(env))
    return {**policy.environment(), **env}
