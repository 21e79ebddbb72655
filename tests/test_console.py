"""The jobs' console: a user error (dagster.Failure) shows its message without Dagster's frames; a bug keeps
its stack trace."""

from __future__ import annotations

import dagster as dg

from tidpo_pipeline.console import tidpo_console, without_failure_trace
from tidpo_pipeline.definitions import defs
from tidpo_pipeline.run import run_config_for


@dg.asset
def bad_file() -> None:
    raise dg.Failure(
        description="/data/pairs.jsonl: no valid rows, 2 quarantined", metadata={"path": "/data/pairs.jsonl"}
    )


@dg.asset
def buggy() -> None:
    raise ZeroDivisionError("a bug in the asset")


def _console_output(asset: dg.AssetsDefinition, capfd) -> str:
    job = dg.Definitions(
        assets=[asset], loggers={"console": tidpo_console}
    ).resolve_implicit_global_asset_job_def()
    # As `tidpo run` (tidpo_pipeline.run) configures it.
    result = job.execute_in_process(run_config=run_config_for("", ""), raise_on_error=False)
    assert not result.success
    captured = capfd.readouterr()
    return captured.out + captured.err


def test_a_user_error_prints_its_message_without_frames(capfd):
    output = _console_output(bad_file, capfd)
    assert "/data/pairs.jsonl: no valid rows, 2 quarantined" in output
    assert "Stack Trace" not in output and 'File "' not in output


def test_a_bug_keeps_its_stack_trace(capfd):
    output = _console_output(buggy, capfd)
    assert "ZeroDivisionError: a bug in the asset" in output
    assert "Stack Trace" in output and "in buggy" in output


def test_only_a_failure_s_trace_is_cut():
    failure = 'Execution of step "x" failed.\n\ndagster._core.definitions.events.Failure: bad file\n\nStack Trace:\n  File "a.py", line 1\n'
    assert (
        without_failure_trace(failure)
        == 'Execution of step "x" failed.\n\ndagster._core.definitions.events.Failure: bad file\n'
    )
    bug = 'Execution of step "x" failed.\n\nKeyError: 3\n\nStack Trace:\n  File "a.py", line 1\n'
    assert without_failure_trace(bug) == bug
    assert without_failure_trace("STEP_SUCCESS") == "STEP_SUCCESS"


def test_the_pipeline_s_jobs_use_this_console():
    job = defs.resolve_job_def("tidpo_training")
    assert job.loggers["console"] is tidpo_console
