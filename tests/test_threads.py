"""The thread plan's arithmetic: CPUs from the affinity mask and the cgroup quota, one thread for a small
model, TIDPO_NUM_THREADS over both, and the governor that gives threads away while other processes run."""

from __future__ import annotations

import os

import dagster as dg
import pytest

from tidpo_core.runtime import threads
from tidpo_core.runtime.threads import (
    available_cpus,
    cgroup_cpu_quota,
    decide_threads,
    requested_threads,
    thread_environment,
    threads_for,
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
    assert "small model" in small.reason and "8" in large.reason
    # Only a count above one has a thread to give away; a count the user fixed stays fixed.
    assert (small.adapts, large.adapts, unknown.adapts) == (False, True, True)
    assert not decide_threads(1, 10**9).adapts and not decide_threads(8, 10**9, requested=8).adapts


def test_the_processes_of_one_launch_share_the_cpus(monkeypatch):
    assert (threads.cpu_share(16, 2), threads.cpu_share(2, 2), threads.cpu_share(1, 4)) == (
        8,
        1,
        1,
    )  # never zero
    assert threads.local_processes({"LOCAL_WORLD_SIZE": "2"}) == 2
    assert threads.local_processes({}) == threads.local_processes({"LOCAL_WORLD_SIZE": "x"}) == 1
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.plan_for(10**9).intra_op == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.plan_for(10**9).intra_op == 8


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
    assert env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/bin"}
    # OpenMP's own wait (spin about 3 ms, then sleep) is the policy's: no wait variable is set.
    assert "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env
    assert "TIDPO_NUM_THREADS" not in env  # the child decides for its own model
    kept = thread_environment(
        None, base={"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "0", "TIDPO_NUM_THREADS": "3"}
    )
    assert (
        kept["OMP_WAIT_POLICY"] == "ACTIVE"
        and kept["GOMP_SPINCOUNT"] == "0"
        and kept["OMP_NUM_THREADS"] == "3"
    )


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


@pytest.mark.parametrize(
    ("ceiling", "cpus", "others", "threads_left"),
    [
        (2, 2, 0.0, 2),  # alone: the ceiling, as torch's defaults
        (2, 2, 0.2, 2),  # a mostly idle `dagster dev` beside it takes nothing
        (2, 2, 0.3, 1),  # more than a quarter of a CPU counts as a CPU taken
        (2, 2, 1.0, 1),  # a twin on one thread
        (2, 2, 2.0, 1),  # a twin on both: never zero
        (8, 8, 3.1, 5),  # ceil(3.1 - 0.25) = 3 CPUs taken
        (4, 8, 1.0, 4),  # never above the ceiling (a launch's share)
    ],
)
def test_threads_beside_others_gives_one_thread_per_cpu_taken(ceiling, cpus, others, threads_left):
    assert threads.threads_beside_others(ceiling, cpus, others) == threads_left


PROC_STAT = """cpu  300 10 60 900 5 1 2 70 0 0
cpu0 100 0 20 500 5 1 1 30 0 0
cpu1 200 10 40 400 0 0 1 40 0 0
intr 1 2 3
ctxt 42
"""


def test_busy_cpu_seconds_counts_user_nice_system_irq_softirq_of_the_listed_cpus():
    # cpu0: 100 + 0 + 20 + 1 + 1 = 122 ticks; cpu1: 200 + 10 + 40 + 0 + 1 = 251 (idle, iowait and steal left out)
    assert threads.busy_cpu_seconds(PROC_STAT, {0}, ticks_per_second=100) == pytest.approx(1.22)
    assert threads.busy_cpu_seconds(PROC_STAT, {0, 1}, ticks_per_second=100) == pytest.approx(3.73)
    assert threads.busy_cpu_seconds(PROC_STAT, {1, 7}, ticks_per_second=250) == pytest.approx(251 / 250)
    assert threads.busy_cpu_seconds(PROC_STAT, set()) == 0.0  # the all-CPU line never counts


def test_cgroup_cpu_seconds_reads_v2_then_v1(tmp_path):
    assert threads.cgroup_cpu_seconds(tmp_path) is None
    (tmp_path / "cpuacct").mkdir()
    (tmp_path / "cpuacct" / "cpuacct.usage").write_text("2500000000\n")
    assert threads.cgroup_cpu_seconds(tmp_path) == pytest.approx(2.5)
    (tmp_path / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    assert threads.cgroup_cpu_seconds(tmp_path) == pytest.approx(1.5)


class FakeMachine:
    """A clock, the machine's busy CPU-seconds and this process's own CPU-seconds, advanced by hand."""

    def __init__(self) -> None:
        self.now = self.busy = self.own = 0.0
        self.set_to: list[int] = []

    def run(self, seconds: float, own_cpus: float, other_cpus: float) -> None:
        self.now += seconds
        self.own += own_cpus * seconds
        self.busy += (own_cpus + other_cpus) * seconds

    def governor(self, ceiling: int = 2, cpus: int = 2) -> threads.ThreadGovernor:
        return threads.ThreadGovernor(
            ceiling,
            cpus,
            read_busy=lambda: self.busy,
            read_own=lambda: self.own,
            clock=lambda: self.now,
            set_threads=self.set_to.append,
        )


def test_the_governor_keeps_the_ceiling_alone_and_gives_a_thread_to_a_twin():
    machine = FakeMachine()
    governor = machine.governor()
    machine.run(threads.FIRST_LOOK_S, own_cpus=2.0, other_cpus=0.1)
    assert governor.look() == 2 and machine.set_to == []  # alone (a 0.1-CPU neighbour takes nothing)
    machine.run(threads.LOOK_EVERY_S / 2, own_cpus=2.0, other_cpus=2.0)
    assert governor.look() == 2 and machine.set_to == []  # no look before one is due, however busy
    machine.run(threads.LOOK_EVERY_S / 2, own_cpus=2.0, other_cpus=2.0)
    assert governor.look() == 1 and machine.set_to == [1]  # a twin started: one thread
    machine.run(threads.LOOK_EVERY_S, own_cpus=1.0, other_cpus=1.0)
    assert governor.look() == 1 and machine.set_to == [1]  # both on one thread: stays (no flapping)
    machine.run(threads.LOOK_EVERY_S, own_cpus=1.0, other_cpus=0.0)
    assert governor.look() == 2 and machine.set_to == [1, 2] and governor.changes == 2  # the twin finished


def test_the_governor_measures_the_others_over_the_window_since_its_last_look():
    machine = FakeMachine()
    governor = machine.governor(ceiling=8, cpus=8)
    machine.run(2.0, own_cpus=4.0, other_cpus=3.0)  # a long gap between forward passes: one window
    assert governor.look() == 5  # 8 - ceil(3.0 - 0.25)
    machine.run(threads.LOOK_EVERY_S, own_cpus=5.0, other_cpus=0.0)
    assert governor.look() == 8


@pytest.fixture
def busy(monkeypatch) -> dict[str, float]:
    """Two CPUs, no TIDPO_NUM_THREADS, and the machine's busy CPU-seconds as a counter the test advances;
    the governor's first look is due at once."""
    monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    counter = {"seconds": 0.0}
    monkeypatch.setattr(threads, "machine_busy_reader", lambda: lambda: counter["seconds"])
    monkeypatch.setattr(threads, "FIRST_LOOK_S", 0.0)
    return counter


def test_threads_for_lowers_torch_s_count_before_a_forward_while_others_are_busy(busy):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(400, 400)  # 160,400 parameters: above the one-thread toy size
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    with threads_for(model) as policy:
        assert policy.intra_op == 2 and policy.adapts
        busy["seconds"] += 1e6  # another process kept both CPUs busy since the governor's first reading
        model(torch.ones(1, 400))
    assert seen == [1]
    assert torch.get_num_threads() == before  # restored on exit
    model(torch.ones(1, 400))
    assert seen == [1, before]  # the governor's hook is gone with the block


def test_a_nested_block_s_policy_is_not_undone_by_the_outer_governor(busy, monkeypatch):
    """A block nested in another (sampling inside an evaluation) governs itself: the outer governor must not
    hand threads back while the inner block holds its own count."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(threads, "LOOK_EVERY_S", 0.0)
    model = torch.nn.Linear(400, 400)
    toy = torch.nn.Linear(10, 10)  # under the toy size: a one-thread block
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    with threads_for(model):
        busy["seconds"] += 1e6  # another process busy: the outer governor gives a thread away
        model(torch.ones(1, 400))
        # The other process is gone: from here on the outer governor, were it looking, would want both back.
        with threads_for(toy) as inner:
            assert inner.intra_op == 1
            model(torch.ones(1, 400))
        model(torch.ones(1, 400))
    assert seen == [1, 1, 2]
