"""How many threads each tidpo process gives torch and OpenMP: decided, not left to the defaults.

torch's default is one intra-op thread per core it can see, and OpenMP's threads spin while they wait for
work. On a machine that runs anything else (a second experiment, `dagster dev`, the MLflow UI, Dagster's
multiprocess executor), those spinning threads take the cores the other process needs, and a small model,
whose every op is tiny, spends its time in that synchronisation. bench/bench_contention.py measured, on
2 cores, the weights pass 13x and SFT steps 28x slower beside one identical process under those defaults.
With passive waits and the same two threads: 1.5x and 1.8x, at no cost alone. One thread per process
also avoids the collapse but made the embedded 1M-parameter model 2x slower on an idle machine. So every
process tidpo starts runs under this policy:

- the CPUs it may use are the fewer of its affinity mask and its cgroup CPU quota (a container limited to
  2 CPUs on a 64-core host sees 64 cores but gets 2);
- one intra-op thread per usable CPU, except for a toy model (under SMALL_MODEL_PARAMETERS, the tests'
  models), where ops are too small to split;
- one inter-op thread (tidpo runs one model call at a time), and OpenMP waits passively
  (``OMP_WAIT_POLICY=PASSIVE``, set when tidpo_core is imported, before torch loads OpenMP, unless the
  user set it): a waiting thread sleeps instead of burning a core.

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

NUM_THREADS_ENV = "TIDPO_NUM_THREADS"
# Below this, one thread. Set below every model bench/bench_contention.py measured: the embedded model
# (1M parameters) and a 21M one both ran faster on 2 threads than on 1 on an idle 2-core machine.
SMALL_MODEL_PARAMETERS = 100_000
WAIT_POLICY = "PASSIVE"


@dataclass(frozen=True)
class ThreadPolicy:
    intra_op: int
    """torch.set_num_threads: threads inside one op (matmul, attention)."""
    inter_op: int
    """torch.set_num_interop_threads: ops run at the same time (tidpo runs one at a time)."""
    omp_wait_policy: str
    """OMP_WAIT_POLICY for processes started under this policy: PASSIVE sleeps while waiting."""
    reason: str
    """Why these numbers, for logs and run metadata."""

    def environment(self) -> dict[str, str]:
        """The variables a child process needs to start under this policy (OpenMP reads them at load)."""
        return {
            "OMP_NUM_THREADS": str(self.intra_op),
            "MKL_NUM_THREADS": str(self.intra_op),
            "OMP_WAIT_POLICY": self.omp_wait_policy,
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


def decide_threads(cpus: int, model_parameters: int | None, requested: int | None = None) -> ThreadPolicy:
    """The policy for a process with `cpus` usable CPUs running a model of `model_parameters` (None: not
    known yet, treated as large). `requested` (TIDPO_NUM_THREADS) wins when given."""
    if requested is not None:
        return ThreadPolicy(requested, 1, WAIT_POLICY, f"{NUM_THREADS_ENV}={requested}")
    if model_parameters is not None and model_parameters < SMALL_MODEL_PARAMETERS:
        return ThreadPolicy(1, 1, WAIT_POLICY, f"small model ({model_parameters:,} parameters): one thread")
    size = "model size unknown" if model_parameters is None else f"{model_parameters:,} parameters"
    return ThreadPolicy(cpus, 1, WAIT_POLICY, f"{size}: one thread per available CPU ({cpus})")


def policy_for(model_parameters: int | None = None) -> ThreadPolicy:
    """The policy for this process now: its CPUs, the model's size, and TIDPO_NUM_THREADS."""
    return decide_threads(available_cpus(), model_parameters, requested_threads())


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
def threads_for(*models: object) -> Iterator[ThreadPolicy]:
    """Run the block under the policy for `models` (on CPU), then restore torch's previous thread count."""
    import torch

    previous = torch.get_num_threads()
    on_cpu = all(next(iter(m.parameters())).device.type == "cpu" for m in models)  # type: ignore[attr-defined]
    policy = policy_for(parameter_count(*models)) if on_cpu else policy_for(None)
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
