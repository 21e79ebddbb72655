"""How a failed step reaches the user: a user's mistake (a bad file, a missing model, a wrong setting) as a
Dagster Failure with its message and no traceback; a failed precompute process with its step's message; and
after a run, one line per failed step with its reason and, where tidpo knows one, what to do about it."""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.precompute import PrecomputeFailed


def user_error(message: str, **context: Any) -> dg.Failure:
    """A failure caused by the user's input (a bad file, a missing model, a wrong setting), not by a bug:
    raised `from None`, so the log shows the message and the paths (as metadata), not chained tracebacks."""
    metadata = {
        name: dg.MetadataValue.json(value) if isinstance(value, list | dict) else str(value)
        for name, value in context.items()
    }
    return dg.Failure(description=message, metadata=metadata)


@contextmanager
def user_errors_as_failures() -> Iterator[None]:
    """A step's UserInputError (a bad file, a missing model) becomes a Failure without a traceback."""
    try:
        yield
    except UserInputError as exc:
        raise user_error(str(exc), **exc.context) from None


@contextmanager
def precompute_failures_as_failures() -> Iterator[None]:
    """A failed precompute process: a Failure with the step's message (finished shards are kept)."""
    try:
        yield
    except PrecomputeFailed as exc:
        raise dg.Failure(description=str(exc)) from exc


# A model that is neither a local folder nor in the Hugging Face cache, with the hub out of reach.
_MODEL_UNAVAILABLE = re.compile(r"not available|offline|\bhub\b|huggingface", re.IGNORECASE)


def failure_lines(result: dg.ExecuteInProcessResult) -> list[str]:
    """What went wrong, for the run's closing summary: one line per failed step with its reason, a hint
    when tidpo knows what to do about it, and one line for the steps that did not run because of it."""
    lines: list[str] = []
    for event in result.get_step_failure_events():
        step = event.step_key or "?"
        reason = failure_reason(event)
        lines.append(f"failed   {step}: {reason.splitlines()[0] if reason else 'no message'}")
        hint = failure_hint(step, reason)
        if hint:
            lines.append(f"         what to do: {hint}")
    if not lines and not result.success:  # failed outside any step (a resource, the executor)
        failure = next(
            (e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE), None
        )
        error = failure.job_failure_data.error if failure and failure.job_failure_data else None
        reason = (
            _error_text(_root(error), with_class=True)
            if error
            else (failure.message if failure else "") or "no message"
        )
        lines.append(f"failed   the run: {reason.splitlines()[0]}")
    skipped = skipped_steps(result)
    if skipped and lines:
        lines.append(f"skipped  {', '.join(skipped)} because an upstream step failed")
    return lines


def failure_reason(event: dg.DagsterEvent) -> str:
    """The message the user needs from a step failure: a dagster.Failure's description (tidpo's user
    errors), else the first tidpo UserInputError in the cause chain, else the root error (a bug)."""
    data = event.step_failure_data
    if data is None:
        return event.message or ""
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description.strip()
    chain = _chain(data.error)
    if not chain:
        return ""
    chosen = next((e for e in chain if e.cls_name == "UserInputError"), chain[-1])
    return _error_text(chosen, with_class=chosen.cls_name != "UserInputError")


def _chain(error: Any) -> list[Any]:
    """A serialized error and its causes, outermost first."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause
    return chain


def _root(error: Any) -> Any:
    return _chain(error)[-1]


def _error_text(error: Any, with_class: bool) -> str:
    """A serialized error's message without the module path Dagster puts before it."""
    message = (error.message or "").strip()
    head, sep, rest = message.partition(": ")
    if sep and (head == error.cls_name or head.endswith(f".{error.cls_name}")):
        message = rest
    elif message in (error.cls_name, f"{error.cls_name}:"):
        message = ""
    return f"{error.cls_name}: {message}" if with_class else message


def failure_hint(step: str, reason: str) -> str:
    """What to do about a failure tidpo recognizes; empty otherwise."""
    if "model" in reason.lower() and _MODEL_UNAVAILABLE.search(reason):
        setting = (
            "`reference_model.model_name_or_path`"
            if step == "reference_model"
            else f"the model setting of {step}"
        )
        return (
            f"point {setting} at a local folder or a GGUF file (or the short name `smollm2-135m-instruct`), "
            "or unset HF_HUB_OFFLINE if this machine has a network"
        )
    return ""


def skipped_steps(result: dg.ExecuteInProcessResult) -> list[str]:
    """The job's steps that never started (Dagster abandons the steps downstream of a failure)."""
    started = {
        e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START and e.step_key
    }
    nodes = [node.name for node in result.job_def.nodes_in_topological_order]
    return [n for n in nodes if not any(key == n or key.startswith(f"{n}.") for key in started)]
