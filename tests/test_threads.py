"""The thread policy's arithmetic: CPUs from the affinity mask and the cgroup quota, one thread for a small
model, TIDPO_NUM_THREADS over both."""

from __future__ import annotations

import os

import dagster as dg
import pytest

from tidpo_core import threads
from tidpo_core.threads import (
    available_cpus,
    cgroup_cpu_quota,
    decide_threads,
    requested_threads,
    thread_environment,
)
from tidpo_pipeline.resources import ComputeThreads


def test_cgroup_v2_quota_and_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None


@pytest.mark.parametrize(
    ("affinity", "quota", "cpus"),
    [
        (set(range(64)), 2.0, 2),  # a container limited to 2 CPUs on a 64-core host
        (set(range(64)), 1.5, 2),  # a fractional quota rounds up
        (set(range(64)), 0.5, 1),
        ({0, 3}, None, 2),  # taskset -c 0,3: the mask alone
        ({0, 1, 2, 3}, 8.0, 4),  # a quota above the mask changes nothing
        (set(), None, 1),
    ],
)
def test_available_cpus_is_the_mask_capped_by_the_quota(affinity, quota, cpus):
    assert available_cpus(affinity, quota) == cpus


def test_a_small_model_gets_one_thread_a_large_one_every_cpu():
    small = decide_threads(8, threads.SMALL_MODEL_PARAMETERS - 1)
    large = decide_threads(8, threads.SMALL_MODEL_PARAMETERS)
    unknown = decide_threads(8, None)
    assert (small.intra_op, large.intra_op, unknown.intra_op) == (1, 8, 8)
    assert {small.inter_op, large.inter_op, unknown.inter_op} == {1}
    assert {small.omp_wait_policy, large.omp_wait_policy} == {"PASSIVE"}
    assert {small.spin_count, large.spin_count} == {"1000"}
    assert "small model" in small.reason and "8" in large.reason


def test_sampling_a_small_model_gets_one_thread_a_large_one_every_cpu():
    """Token-by-token sampling keeps ops tiny for longer: bench_contention measured one thread 2.4x faster on the
    embedded 1M-parameter model, and slightly slower on a 21M one."""
    below = decide_threads(8, threads.SMALL_GENERATION_PARAMETERS - 1, workload="generate")
    at = decide_threads(8, threads.SMALL_GENERATION_PARAMETERS, workload="generate")
    same_model_training = decide_threads(8, threads.SMALL_GENERATION_PARAMETERS - 1)
    assert (below.intra_op, at.intra_op, same_model_training.intra_op) == (1, 8, 8)
    assert "sampling" in below.reason
    assert decide_threads(8, None, workload="generate").intra_op == 8  # size unknown: treated as large
    assert decide_threads(8, 1_000_000, requested=3, workload="generate").intra_op == 3


def test_the_processes_of_one_launch_share_the_cpus(monkeypatch):
    assert (threads.cpu_share(16, 2), threads.cpu_share(2, 2), threads.cpu_share(1, 4)) == (8, 1, 1)  # never zero
    assert threads.local_processes({"LOCAL_WORLD_SIZE": "2"}) == 2
    assert threads.local_processes({}) == threads.local_processes({"LOCAL_WORLD_SIZE": "x"}) == 1
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.policy_for(10**9).intra_op == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.policy_for(10**9).intra_op == 8


def test_tidpo_num_threads_wins_over_size_and_cpus():
    assert decide_threads(2, 1_000, requested=4).intra_op == 4
    assert decide_threads(64, 10**10, requested=1).intra_op == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_tidpo_num_threads_is_refused_by_name(value):
    with pytest.raises(ValueError, match="TIDPO_NUM_THREADS"):
        requested_threads({"TIDPO_NUM_THREADS": value})


def test_unset_or_empty_tidpo_num_threads_is_no_request():
    assert requested_threads({}) is None and requested_threads({"TIDPO_NUM_THREADS": " "}) is None
    assert requested_threads({"TIDPO_NUM_THREADS": "3"}) == 3


def test_a_child_gets_the_policy_s_environment_but_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)
    env = thread_environment(1_000, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE" and env["PATH"] == "/bin"
    assert env["GOMP_SPINCOUNT"] == "1000"
    assert "TIDPO_NUM_THREADS" not in env  # the child decides for its own model
    kept = thread_environment(None, base={"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "0", "TIDPO_NUM_THREADS": "3"})
    assert kept["OMP_WAIT_POLICY"] == "ACTIVE" and kept["GOMP_SPINCOUNT"] == "0" and kept["OMP_NUM_THREADS"] == "3"


def test_the_compute_resource_sets_the_thread_count_for_the_step_and_its_children(monkeypatch):
    monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    seen = {}

    @dg.asset
    def uses_a_model(compute: ComputeThreads) -> None:
        seen["requested"] = requested_threads()
        # The policy's own value: without an OMP_NUM_THREADS set earlier in this process (bench.common sets one).
        unset = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
        seen["child"] = thread_environment(1_000, unset)["OMP_NUM_THREADS"]

    assert dg.materialize([uses_a_model], resources={"compute": ComputeThreads(num_threads=2)}).success
    assert seen == {"requested": 2, "child": "2"}
    monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    assert dg.materialize([uses_a_model], resources={"compute": ComputeThreads()}).success
    assert seen == {"requested": None, "child": "1"}  # automatic: one thread for a small model
    monkeypatch.setenv("TIDPO_NUM_THREADS", "many")
    result = dg.materialize([uses_a_model], resources={"compute": ComputeThreads()}, raise_on_error=False)
    assert not result.success
