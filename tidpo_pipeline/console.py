"""The console logger of tidpo's jobs: Dagster's colored console logger, minus the stack trace of a
`dagster.Failure`.

The assets raise Failure for what the user can fix (a bad file, a wrong setting, a missing model), with
the message and the paths as metadata; the Dagster frames under it only bury that message. Any other
exception is a bug and keeps its full trace. The UI's event log keeps the trace in both cases.

Dagster uses a job's console logger when the run config names it: `tidpo run` (and so `make run`) does.
"""

from __future__ import annotations

import logging

import dagster as dg
from dagster._utils.log import create_console_logger

FAILURE_PREFIX = "dagster._core.definitions.events.Failure:"
STACK_TRACE_MARK = "\nStack Trace:\n"


def without_failure_trace(message: str) -> str:
    """`message` with the stack trace cut off when the error it reports is a dagster.Failure."""
    if FAILURE_PREFIX not in message or STACK_TRACE_MARK not in message:
        return message
    return message.split(STACK_TRACE_MARK, 1)[0].rstrip() + "\n"


class _FailureWithoutTrace(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = without_failure_trace(record.msg)
        return True


@dg.logger(
    {
        "log_level": dg.Field(
            str, is_required=False, default_value="INFO", description="The logger's threshold."
        ),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
    },
    description="Dagster's colored console logger; a dagster.Failure (a user error) shows its message, not its frames.",
)
def tidpo_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    console = create_console_logger(name=config["name"], level=config["log_level"].upper())
    for handler in console.handlers:
        handler.addFilter(_FailureWithoutTrace())
    return console
