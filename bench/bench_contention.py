"""Throughput on a busy machine: each heavy stage alone, then with a second identical process beside it.

Stages (the pipeline's own code, on the embedded model shape and the built-in pairs):
- `weights`: tidpo_core.method.importance.compute_token_importance over the chosen and rejected responses
  (what the token_weights asset runs);
- `train`: tidpo_core.models.sft.supervised_finetune steps (forward, backward, AdamW: the reference model's SFT,
  the same work per step as a training step without the preference loss);
- `sample`: tidpo_core.models.generation.sample_responses (what anchor_responses and the evaluation run).

Each stage runs in fresh worker processes (python -m bench.bench_contention --worker ...) under two
policies: `default` (what torch and OpenMP do on their own: one thread per core, OpenMP threads spin while
they wait; pinned with TIDPO_NUM_THREADS, since the stages apply the policy themselves, and a pinned count
does not adapt) and `tidpo` (tidpo_core.runtime.threads: the environment the launcher gives a child, then the policy
for the model, whose governor gives threads away while the twin runs). Workers build their model and data
first, then wait at a barrier, so two concurrent workers time the same stretch. Slowdown = time with a second process / time alone, per policy
(target for `tidpo`: <= 2.5x with 2 processes on 2 cores; fair sharing is 2x on ideal hardware). Fair sharing
on this machine is timed beside them: two processes fixed at one thread each, against torch's defaults alone
(`fair_share_slowdown`: one thread is not exactly half as fast as two, and two busy vCPUs slow each other
down). The cost on an idle
machine is tidpo alone / default alone (target: within 5%), measured in one process that alternates the two
(pairs seconds apart); the same ratio between the separate processes (minutes apart) is reported beside it.

This machine drifts by tens of percent over minutes, so every ratio is paired: both of its timings come from
the same round (a round times every setting alone, in a shuffled order, then every setting beside a twin),
and the figure is the median over rounds. Each worker first runs a small slice of its stage untimed
(OpenMP's thread pool, allocator and caches warm), so a round times the steady state rather than whichever
process happened to start cold.

The policy's size threshold is measured too: each stage alone on one thread and on every CPU, for the
embedded model and a model about 20x larger.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.rounds import median_paired_ratio, round_order

NAME = "contention"
SLOWDOWN_TARGET = 2.5
IDLE_COST_TARGET = 1.05
STAGES = ("weights", "train", "sample")
POLICIES = ("default", "tidpo")
# A fixed single thread per process: what fair sharing of the CPUs gives on this machine, beside the policies.
ONE_THREAD_EACH = "one_thread_each"
# The policy's environment variables; `default` runs without any of them.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "TIDPO_NUM_THREADS",
)
# How OpenMP's idle threads wait, with the policy's thread counts (its governor included): libgomp (torch's
# OpenMP on Linux) spins GOMP_SPINCOUNT times (about 100,000 per ms) before it sleeps; without either variable
# it spins 300,000 times (about 3 ms), and OMP_WAIT_POLICY=PASSIVE alone means no spin. `openmp_default` is
# the policy itself: it sets neither.
WAIT_CANDIDATES: dict[str, dict[str, str]] = {
    "openmp_default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    "spin_1k": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"},
}
SHAPES = {
    "embedded": {},
    "larger": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
    },
}


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "pairs": 16,
            "train_steps": 3,
            "sample_prompts": 8,
            "new_tokens": 8,
            "rounds": 1,
            "wait_rounds": 1,
            "interleaved_rounds": 2,
        }
    return {
        "pairs": 192,
        "train_steps": 40,
        "sample_prompts": 64,
        "new_tokens": 48,
        "rounds": 4,
        "wait_rounds": 2,
        "interleaved_rounds": 8,
    }


# --- the worker ------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    import torch

    from tidpo_core.batching.features import EncodingSettings, encode_response
    from tidpo_core.data.synthetic import generate_synthetic_pairs
    from tidpo_core.method.importance import compute_token_importance
    from tidpo_core.models.generation import SamplingSettings, sample_responses
    from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer
    from tidpo_core.models.sft import supervised_finetune
    from tidpo_core.runtime import threads

    pairs = generate_synthetic_pairs(args.pairs, seed=0)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)])
    model = build_tiny_model(tokenizer, TinyModelConfig(**SHAPES[args.shape]), seed=0)
    encoding = EncodingSettings()
    if args.stage == "weights":
        encoded = [
            encode_response(tokenizer, p.prompt, r, encoding) for p in pairs for r in (p.chosen, p.rejected)
        ]

        def work(warm_up: bool = False) -> None:
            compute_token_importance(model, encoded[:16] if warm_up else encoded, batch_size=16)
    elif args.stage == "train":
        examples = [(p.prompt, p.chosen) for p in pairs]

        def work(warm_up: bool = False) -> None:
            steps = 1 if warm_up else args.train_steps
            supervised_finetune(model, tokenizer, examples, steps=steps, batch_size=16, settings=encoding)
    else:
        prompts = [p.prompt for p in pairs[: args.sample_prompts]]

        def work(warm_up: bool = False) -> None:
            tokens = 4 if warm_up else args.new_tokens
            settings = SamplingSettings(max_new_tokens=tokens, batch_size=16, seed=0)
            sample_responses(model, tokenizer, prompts[:16] if warm_up else prompts, settings)

    if args.interleave:
        print(json.dumps(_interleaved(work, args.interleave)))
        return
    # The stages apply the policy themselves (threads_for), from the environment _environment gave.
    with threads.threads_for(model):
        used = torch.get_num_threads()
        # The thread count at every forward pass of the timed work: what the governor chose, and when.
        counts: list[int] = []
        model.register_forward_pre_hook(lambda *_: counts.append(torch.get_num_threads()) and None)
        work(warm_up=True)
        Path(args.ready).touch()
        deadline = time.monotonic() + 600
        while not Path(args.go).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no go signal")
            time.sleep(0.01)
        counts.clear()
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
    mean_threads = round(sum(counts) / len(counts), 2) if counts else float(used)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "threads": used,
                "mean_threads": mean_threads,
                "parameters": threads.parameter_count(model),
            }
        )
    )


def _interleaved(work: Any, rounds: int) -> dict[str, list[float]]:
    """Both policies alone in one process, alternating (the order flips every round), so a pair's timings are
    seconds apart, not minutes as between separate processes on a drifting VM. The stages read
    TIDPO_NUM_THREADS at every call: pinned to the CPU count, it is torch's default count, which does not
    adapt; unset, it is the policy. Both run under OpenMP's own wait, as the policy does."""
    work(warm_up=True)
    times: dict[str, list[float]] = {p: [] for p in POLICIES}
    for index in range(rounds):
        for policy in round_order(POLICIES, index):
            if policy == "default":
                os.environ["TIDPO_NUM_THREADS"] = str(os.cpu_count() or 1)
            else:
                os.environ.pop("TIDPO_NUM_THREADS", None)
            started = time.perf_counter()
            work()
            times[policy].append(time.perf_counter() - started)
    return times


# --- the driver ------------------------------------------------------------------------------------------


def _environment(policy: str, threads: int = 0, wait: str = "") -> dict[str, str]:
    """The worker's environment. tidpo_core applies the policy inside the stages themselves (threads_for), so
    `default` pins TIDPO_NUM_THREADS to what torch would pick on its own (one thread per core) and leaves
    OpenMP's wait policy alone; `threads` > 0 pins that count under the policy's wait (the size-threshold
    runs, alone, under OpenMP's own wait like the policy); `wait` (a WAIT_CANDIDATES name) sets OpenMP's wait."""
    from tidpo_core.runtime.threads import thread_environment

    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    base.update({"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"})
    if threads:
        return {**base, "TIDPO_NUM_THREADS": str(threads)}
    if policy == "default":
        return {**base, "TIDPO_NUM_THREADS": str(os.cpu_count() or 1)}
    # The launcher's child environment: the model's size is not known before the child loads it.
    return thread_environment(None, base) | WAIT_CANDIDATES.get(wait, {})


def _worker_command(stage: str, policy: str, sizes: dict[str, Any], shape: str = "embedded") -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.bench_contention",
        "--worker",
        "--stage",
        stage,
        "--policy",
        policy,
        "--shape",
        shape,
        "--pairs",
        str(sizes["pairs"]),
        "--train-steps",
        str(sizes["train_steps"]),
        "--sample-prompts",
        str(sizes["sample_prompts"]),
        "--new-tokens",
        str(sizes["new_tokens"]),
    ]


def _root() -> Path:
    return Path(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or Path(__file__).resolve().parents[1])


def _run_interleaved(stage: str, sizes: dict[str, Any]) -> dict[str, list[float]]:
    """One worker timing the stage alone under both policies in turn (_interleaved)."""
    command = [*_worker_command(stage, "tidpo", sizes), "--interleave", str(sizes["interleaved_rounds"])]
    done = subprocess.run(
        command,
        cwd=_root(),
        env=_environment("tidpo"),
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_together(
    count: int,
    stage: str,
    policy: str,
    sizes: dict[str, Any],
    shape: str = "embedded",
    threads: int = 0,
    wait: str = "",
) -> list[dict[str, Any]]:
    """`count` workers of one stage at once, released together; their timings."""
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        workers = []
        for i in range(count):
            ready = Path(tmp) / f"ready{i}"
            command = [*_worker_command(stage, policy, sizes, shape), "--ready", str(ready), "--go", str(go)]
            env = _environment(policy, threads, wait)
            workers.append(
                (ready, subprocess.Popen(command, cwd=_root(), env=env, stdout=subprocess.PIPE, text=True))
            )
        deadline = time.monotonic() + 900
        while not all(ready.exists() for ready, _ in workers):
            if any(w.poll() not in (None, 0) for _, w in workers) or time.monotonic() > deadline:
                for _, w in workers:
                    w.kill()
                raise RuntimeError(f"a {stage}/{policy} worker failed before the start")
            time.sleep(0.05)
        go.touch()
        results = []
        for _, w in workers:
            out, _ = w.communicate(timeout=1800)
            if w.returncode != 0:
                raise RuntimeError(f"{stage}/{policy} worker exited {w.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _run_setting(count: int, stage: str, setting: str, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """_run_together for a guard setting: a policy, or ONE_THREAD_EACH (a fixed single thread, no governor)."""
    if setting == ONE_THREAD_EACH:
        return _run_together(count, stage, "default", sizes, threads=1)
    return _run_together(count, stage, setting, sizes)


def _paired(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of one round's ratio, to the thousandth."""
    return round(median_paired_ratio(numerators, denominators), 3)


def _summary(timings: dict[str, list[float]]) -> dict[str, float]:
    """One setting's rounds, alone and beside a twin: median times and the paired slowdown."""
    return {
        "alone_s": round(statistics.median(timings["alone"]), 3),
        "two_processes_s": round(statistics.median(timings["two"]), 3),
        "slowdown": round(_paired(timings["two"], timings["alone"]), 2),
    }


def _time_stage(stage: str, sizes: dict[str, Any], order: random.Random) -> dict[str, Any]:
    """Every setting of one stage over `rounds`, alone and beside a twin; per setting the seconds of each
    round, the thread count alone, and each worker's mean thread count over its forward passes."""
    settings = (*POLICIES, ONE_THREAD_EACH)
    seconds: dict[str, dict[str, list[float]]] = {p: {"alone": [], "two": []} for p in settings}
    threads_used: dict[str, int] = {}
    # The governor's choice, alone and beside the twin.
    mean_threads: dict[str, dict[str, list[float]]] = {p: {"alone": [], "two": []} for p in settings}
    # A run that follows a two-process run can start slow on a VM (the host's share settles): within a round
    # the runs alone come first, in a shuffled order, then the runs beside a twin, shuffled too.
    for _ in range(sizes["rounds"]):
        for setting in order.sample(settings, len(settings)):
            alone = _run_setting(1, stage, setting, sizes)[0]
            seconds[setting]["alone"].append(alone["seconds"])
            threads_used[setting] = alone["threads"]
            mean_threads[setting]["alone"].append(alone["mean_threads"])
        for setting in order.sample(settings, len(settings)):
            pair = _run_setting(2, stage, setting, sizes)
            seconds[setting]["two"].append(max(r["seconds"] for r in pair))
            mean_threads[setting]["two"].extend(r["mean_threads"] for r in pair)
    return {
        setting: {
            **_summary(seconds[setting]),
            "threads": threads_used[setting],
            "mean_threads": mean_threads[setting],
            "rounds": seconds[setting],
        }
        for setting in settings
    }


def _stage_figures(stage: str, sizes: dict[str, Any], order: random.Random) -> dict[str, Any]:
    """One stage's slowdowns beside a twin, fair sharing, the idle cost, and the targets' verdicts."""
    figures = _time_stage(stage, sizes, order)
    seconds = {setting: figures[setting]["rounds"] for setting in (*POLICIES, ONE_THREAD_EACH)}
    # Fair sharing on this machine: two processes on one thread each, against torch's defaults alone. The
    # best any split of the CPUs can do; the policy's slowdown is judged beside it.
    figures["fair_share_slowdown"] = _paired(seconds[ONE_THREAD_EACH]["two"], seconds["default"]["alone"])
    figures["tidpo_over_fair_share"] = _paired(seconds["tidpo"]["two"], seconds[ONE_THREAD_EACH]["two"])
    # The cost alone twice: between the separate processes above (minutes apart, so the VM's drift is in
    # it), and within one process that alternates the two (seconds apart): the target's figure.
    interleaved = _run_interleaved(stage, sizes)
    figures["tidpo_idle_cost_separate_processes"] = _paired(
        seconds["tidpo"]["alone"], seconds["default"]["alone"]
    )
    figures["tidpo_idle_cost"] = _paired(interleaved["tidpo"], interleaved["default"])
    figures["interleaved"] = {p: [round(t, 3) for t in interleaved[p]] for p in POLICIES}
    figures["slowdown_target_met"] = figures["tidpo"]["slowdown"] <= SLOWDOWN_TARGET
    figures["idle_cost_target_met"] = figures["tidpo_idle_cost"] <= IDLE_COST_TARGET
    return figures


def _wait_settings(stage: str, sizes: dict[str, Any], order: random.Random) -> dict[str, Any]:
    """OpenMP's wait setting, alone and beside a twin, with the policy's thread counts: why the policy leaves
    OpenMP's own wait alone. Each round also times torch's defaults alone, the pair for every idle cost."""
    default_alone: list[float] = []
    timings: dict[str, dict[str, list[float]]] = {w: {"alone": [], "two": []} for w in WAIT_CANDIDATES}
    for _ in range(sizes["wait_rounds"]):  # fewer than the guard's rounds: this table chose a setting
        for setting in order.sample(["default", *WAIT_CANDIDATES], len(WAIT_CANDIDATES) + 1):
            if setting == "default":
                default_alone.append(_run_together(1, stage, "default", sizes)[0]["seconds"])
            else:
                timings[setting]["alone"].append(
                    _run_together(1, stage, "tidpo", sizes, wait=setting)[0]["seconds"]
                )
        for wait in order.sample(list(WAIT_CANDIDATES), len(WAIT_CANDIDATES)):
            timings[wait]["two"].append(
                max(r["seconds"] for r in _run_together(2, stage, "tidpo", sizes, wait=wait))
            )
    return {
        wait: {**_summary(t), "idle_cost": _paired(t["alone"], default_alone)} for wait, t in timings.items()
    }


def _threads_by_size(sizes: dict[str, Any]) -> dict[str, Any]:
    """One thread against all CPUs, alone, per model size: where the policy's size threshold comes from.
    One round: this part sets a threshold, not a guard."""
    cpus = os.cpu_count() or 1
    threshold: dict[str, Any] = {}
    for shape in SHAPES:
        for stage in STAGES:
            results = {
                count: _run_together(1, stage, "default", sizes, shape, threads=count)[0]
                for count in dict.fromkeys((1, cpus))
            }
            one, every = results[1]["seconds"], results[cpus]["seconds"]
            threshold[f"{shape}/{stage}"] = {
                "parameters": results[cpus]["parameters"],
                "one_thread_s": round(one, 3),
                "all_threads_s": round(every, 3),
                "threads": cpus,
                "one_thread_over_all": round(one / every, 2),
            }
    return threshold


def run(quick: bool = False) -> dict[str, Any]:
    from bench import common

    started = time.perf_counter()
    sizes = _sizes(quick)
    order = random.Random(0)
    stages: dict[str, Any] = {}
    for stage in STAGES:
        stages[stage] = figures = _stage_figures(stage, sizes, order)
        common.log(
            NAME,
            f"{stage}: slowdown default {figures['default']['slowdown']}x, tidpo {figures['tidpo']['slowdown']}x, fair share "
            f"{figures['fair_share_slowdown']}x; idle cost "
            f"{figures['tidpo_idle_cost']}x (separate processes {figures['tidpo_idle_cost_separate_processes']}x)",
        )
    waits: dict[str, Any] = {}
    for stage in STAGES:
        waits[stage] = _wait_settings(stage, sizes, order)
        common.log(
            NAME,
            f"{stage} wait settings: "
            + ", ".join(
                f"{w} {v['slowdown']}x busy / {v['idle_cost']}x idle" for w, v in waits[stage].items()
            ),
        )
    figures = {
        "stages": stages,
        "wait_settings": waits,
        "threads_by_size": _threads_by_size(sizes),
        "targets": {"slowdown_with_two_processes": SLOWDOWN_TARGET, "idle_cost": IDLE_COST_TARGET},
        # What `tidpo` ran under (the launcher's child environment; the stages then size threads per model).
        "policy_environment": {k: v for k, v in _environment("tidpo").items() if k in THREAD_VARIABLES},
        "sizes": sizes,
    }
    return common.write_results(NAME, figures, quick, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--policy", choices=POLICIES, default="tidpo")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="embedded")
    parser.add_argument("--ready", default="")
    parser.add_argument("--go", default="")
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--sample-prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--interleave", type=int, default=0, help="time both policies alone in turn, this many rounds"
    )
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    else:
        print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
