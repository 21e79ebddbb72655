"""GPU verification of the training engine: what the CPU tests cannot show.

    python -m bench.gpu_check [--work DIR] [--only ROW ...]     (writes bench/results/gpu.json)

Needs one CUDA GPU; the ZeRO-3 row needs `deepspeed` (not a tidpo dependency) and is skipped, with the
reason, without it. Every row is a real launch of `tidpo_core.training` (the way the tidpo_policy asset
starts it) on the tiny data of tests/train_fixtures.py, 10 optimizer steps of the default loss (tidpo,
alpha 0.5: the frozen reference runs every step):

- single_gpu_bf16: `python -m tidpo_core.training`; mixed precision `auto` must pick bf16 on the GPU. The
  run is repeated to measure run-to-run noise (GPU kernels need not be bitwise deterministic), then a
  run SIGKILLed after step 5 is re-run: its final weights must equal the uninterrupted run's within
  that noise.
- fp32_gpu_vs_cpu: the first step's loss in float32 on the GPU and on the CPU agree (relative 1e-4).
- fsdp: `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1` (sharded
  checkpoints, full state dict gathered for the final model); kill + resume as above.
- deepspeed_zero3: the same with configs/accelerate/deepspeed_zero3.yaml; the reference runs in its
  own inference engine (its weights are partitioned at load).
- lora_bf16: LoRA on the GPU in bf16: only adapter parameters train, the merged model is saved.
- fsdp_lora, deepspeed_zero3_lora: LoRA under each sharded launcher; the gathered adapter merged into
  the base has the base's layout and differs from it.

Prints a table and writes the figures as JSON (with the machine and the git commit).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from train_fixtures import TinyData, build_tiny_data, load_weights, run_engine  # noqa: E402

from tidpo_core.runtime.faults import planted  # noqa: E402
from tidpo_core.runtime.launch import LaunchSettings, accelerate_prefix, failure_reason, read_summary  # noqa: E402
from tidpo_core.runtime.layout import RunDir  # noqa: E402

NAME = "gpu"
KILL_AT_STEP = 5
RESUME_FLOOR = 1e-5
CPU_GPU_LOSS_RTOL = 1e-4


def _accelerate(config_file: str) -> list[str]:
    return accelerate_prefix(LaunchSettings("accelerate", 1, str(ROOT / config_file)))


def _train(
    data: TinyData, work: Path, name: str, launcher: list[str] | None = None, **overrides: Any
) -> dict[str, Any]:
    run_dir = work / name
    config = data.config(run_dir, **{"checkpoint_every": 2, "mixed_precision": "auto", **overrides})
    config_path = config.to_yaml(work / f"{name}.yaml")
    started = time.perf_counter()
    done = run_engine(config_path, launcher=launcher, timeout=400)
    result: dict[str, Any] = {
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "dir": run_dir,
    }
    if RunDir(run_dir).summary.exists():
        result["summary"] = read_summary(run_dir)
    if done.returncode != 0:
        reason = failure_reason(run_dir)
        errors = "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
        result["stderr_tail"] = f"{reason}\n{errors}\n{done.stderr[-1500:]}"
    return result


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_weights(a / "final"), load_weights(b / "final")
    assert wa.keys() == wb.keys(), f"different parameters: {sorted(wa.keys() ^ wb.keys())[:5]}"
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def _ok_run(run: dict[str, Any], what: str) -> dict[str, Any]:
    if run["rc"] != 0:
        raise AssertionError(f"{what} exited {run['rc']}:\n{run.get('stderr_tail', '')}")
    summary = run["summary"]
    if not all(math.isfinite(h["loss"]) for h in summary["history"]):
        raise AssertionError(f"{what}: non-finite loss in its history")
    return summary


def _kill_and_resume(data: TinyData, work: Path, name: str, launcher_fn, **overrides: Any) -> dict[str, Any]:
    """An uninterrupted run, a run SIGKILLed after step KILL_AT_STEP, and its re-run."""
    full = _train(data, work, f"{name}_full", launcher_fn(), **overrides)
    summary = _ok_run(full, f"{name} uninterrupted")
    with planted(kill_at_step=KILL_AT_STEP):
        killed = _train(data, work, f"{name}_resumed", launcher_fn(), **overrides)
    if killed["rc"] == 0:
        raise AssertionError(f"{name}: the run planted with a SIGKILL after step {KILL_AT_STEP} exited 0")
    resumed = _train(data, work, f"{name}_resumed", launcher_fn(), **overrides)
    resumed_summary = _ok_run(resumed, f"{name} re-run after the kill")
    if not resumed_summary.get("resumed_from"):
        raise AssertionError(f"{name}: the re-run did not resume from a checkpoint")
    return {
        "full": full,
        "summary": summary,
        "resumed_from": Path(resumed_summary["resumed_from"]).name,
        "steps": summary["steps"],
        "steps_after_resume": resumed_summary["steps_this_run"],
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "resume_max_abs_diff": _max_diff(full["dir"], resumed["dir"]),
        "loss_by_step": [h["loss"] for h in summary["history"]],
        "loss_by_step_resumed": [h["loss"] for h in resumed_summary["history"]],
        "seconds": full["seconds"],
    }


def check_single_gpu(data: TinyData, work: Path, noise: dict[str, float]) -> dict[str, Any]:
    out = _kill_and_resume(data, work, "single", lambda: None)
    repeat = _train(data, work, "single_repeat")
    _ok_run(repeat, "single repeat")
    noise["max_abs_diff"] = _max_diff(out["full"]["dir"], repeat["dir"])
    summary = out.pop("summary")
    out.pop("full")
    tolerance = max(4 * noise["max_abs_diff"], RESUME_FLOOR)
    out.update(
        mixed_precision=summary["mixed_precision"],
        run_to_run_max_abs_diff=noise["max_abs_diff"],
        tolerance=tolerance,
    )
    if out["resume_max_abs_diff"] > tolerance:
        raise AssertionError(
            f"resumed weights differ by {out['resume_max_abs_diff']:.3g} > {tolerance:.3g}: {out}"
        )
    if summary["mixed_precision"] != "bf16":
        raise AssertionError(
            f"mixed_precision auto chose {summary['mixed_precision']!r} on the GPU, not bf16: {out}"
        )
    return out


def check_fp32_gpu_vs_cpu(data: TinyData, work: Path, noise: dict[str, float]) -> dict[str, Any]:
    losses = {}
    for device, cpu in (("gpu", False), ("cpu", True)):
        run = _train(data, work, f"fp32_{device}", mixed_precision="no", cpu=cpu, max_steps=1)
        losses[device] = _ok_run(run, f"fp32 on {device}")["first_loss"]
    relative = abs(losses["gpu"] - losses["cpu"]) / max(abs(losses["cpu"]), 1e-12)
    if relative > CPU_GPU_LOSS_RTOL:
        raise AssertionError(
            f"first-step loss GPU {losses['gpu']!r} vs CPU {losses['cpu']!r}: relative {relative:.3g}"
        )
    return {"loss_gpu": losses["gpu"], "loss_cpu": losses["cpu"], "relative_diff": relative}


def _sharded(name: str, config_file: str, expected_type: str):
    def check(data: TinyData, work: Path, noise: dict[str, float]) -> dict[str, Any]:
        out = _kill_and_resume(data, work, name, lambda: _accelerate(config_file))
        summary = out.pop("summary")
        full = out.pop("full")
        if summary["distributed_type"] != expected_type:
            raise AssertionError(f"ran as {summary['distributed_type']}, not {expected_type}")
        # A sharded run's numerics differ from the plain run's (bf16 parameters under ZeRO-3, flattened
        # parameters under FSDP), so the resume is held to its own launcher's uninterrupted run, with
        # the single-GPU run-to-run noise (or the floor) as tolerance.
        tolerance = max(4 * noise.get("max_abs_diff", 0.0), RESUME_FLOOR)
        reference = load_weights(data.reference_path)
        final = load_weights(full["dir"] / "final")
        if final.keys() != reference.keys() or any(final[k].shape != reference[k].shape for k in final):
            shapes = {
                k: (tuple(final[k].shape), tuple(reference[k].shape))
                for k in final.keys() & reference.keys()
                if final[k].shape != reference[k].shape
            }
            raise AssertionError(
                f"the final model's parameters are not the reference's: only in final {sorted(final.keys() - reference.keys())}, "
                f"only in reference {sorted(reference.keys() - final.keys())}, shapes (final, reference) {shapes}"
            )
        moved = max((final[k].float() - reference[k].float()).abs().max().item() for k in final)
        out.update(
            distributed_type=summary["distributed_type"],
            mixed_precision=summary["mixed_precision"],
            tolerance=tolerance,
            final_vs_reference_max_abs_diff=moved,
        )
        if moved == 0.0:
            raise AssertionError("the final model equals the reference: nothing was trained")
        if out["resume_max_abs_diff"] > tolerance:
            raise AssertionError(
                f"resumed weights differ by {out['resume_max_abs_diff']:.3g} > {tolerance:.3g}"
            )
        return out

    return check


def check_lora(data: TinyData, work: Path, noise: dict[str, float]) -> dict[str, Any]:
    run = _train(data, work, "lora", lora=True, lora_r=4)
    summary = _ok_run(run, "lora")
    if not 0 < summary["trainable_parameters"] < summary["total_parameters"]:
        raise AssertionError(f"trainable {summary['trainable_parameters']} of {summary['total_parameters']}")
    merged = load_weights(run["dir"] / "final")
    if any("lora" in k for k in merged) or merged.keys() != load_weights(data.reference_path).keys():
        raise AssertionError("the merged model is not a plain model with the reference's parameters")
    return {
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "mixed_precision": summary["mixed_precision"],
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
    }


def _sharded_lora(name: str, config_file: str, expected_type: str):
    """LoRA under a sharded launcher: the gathered adapter is merged into a whole-weights CPU copy of the
    base on the main process (under ZeRO-3 that copy must escape zero.Init partitioning)."""

    def check(data: TinyData, work: Path, noise: dict[str, float]) -> dict[str, Any]:
        run = _train(data, work, name, _accelerate(config_file), lora=True, lora_r=4)
        summary = _ok_run(run, name)
        if summary["distributed_type"] != expected_type:
            raise AssertionError(f"ran as {summary['distributed_type']}, not {expected_type}")
        if not 0 < summary["trainable_parameters"] < summary["total_parameters"]:
            raise AssertionError(
                f"trainable {summary['trainable_parameters']} of {summary['total_parameters']}"
            )
        merged, reference = load_weights(run["dir"] / "final"), load_weights(data.reference_path)
        if merged.keys() != reference.keys() or any(merged[k].shape != reference[k].shape for k in merged):
            raise AssertionError(
                f"merged model is not the base layout: {sorted(merged.keys() ^ reference.keys())[:6]}"
            )
        moved = max((merged[k].float() - reference[k].float()).abs().max().item() for k in merged)
        if moved == 0.0:
            raise AssertionError("the merged model equals the base: the adapter was lost")
        return {
            "distributed_type": summary["distributed_type"],
            "trainable_parameters": summary["trainable_parameters"],
            "total_parameters": summary["total_parameters"],
            "merged_vs_base_max_abs_diff": moved,
        }

    return check


def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or deepspeed failing its own import-time checks
        return f"deepspeed not importable: {type(exc).__name__}: {exc}"
    return None


CHECKS = {
    "single_gpu_bf16": check_single_gpu,
    "fp32_gpu_vs_cpu": check_fp32_gpu_vs_cpu,
    "fsdp": _sharded("fsdp", "configs/accelerate/fsdp.yaml", "FSDP"),
    "deepspeed_zero3": _sharded("deepspeed_zero3", "configs/accelerate/deepspeed_zero3.yaml", "DEEPSPEED"),
    "lora_bf16": check_lora,
    "fsdp_lora": _sharded_lora("fsdp_lora", "configs/accelerate/fsdp.yaml", "FSDP"),
    "deepspeed_zero3_lora": _sharded_lora(
        "deepspeed_zero3_lora", "configs/accelerate/deepspeed_zero3.yaml", "DEEPSPEED"
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--only", nargs="*", default=None, help=f"rows to run, of {list(CHECKS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to check", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tidpo_gpu_"))
    data = build_tiny_data(work / "data", pairs=40)
    rows: dict[str, Any] = {}
    noise: dict[str, float] = {}
    started_all = time.perf_counter()
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        skip = _deepspeed_missing() if name.startswith("deepspeed") else None
        if skip:
            rows[name] = {"status": "skipped", "reason": skip}
        else:
            try:
                rows[name] = {"status": "passed", **check(data, work, noise)}
            except Exception as exc:
                rows[name] = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}"[-4000:],
                    "traceback": traceback.format_exc()[-2000:],
                }
        rows[name]["wall_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {rows[name]['status']} ({rows[name]['wall_seconds']} s)", flush=True)
        common.write_results(NAME, {"rows": rows}, quick=False, started=started_all)
    print(f"\n{'row':<18} {'status':<8} details")
    for name, row in rows.items():
        details = {k: v for k, v in row.items() if k not in ("status", "traceback", "wall_seconds")}
        print(f"{name:<18} {row['status']:<8} {json.dumps(details, default=str)[:300]}")
    return 0 if all(r["status"] != "failed" for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
