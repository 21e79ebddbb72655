"""Narrow silencers for known third-party noise that tidpo's own calls trigger.

Each drops one known message of one logger (or one warning), only around the call that triggers it;
everything else those libraries say still gets through. No blanket filters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextmanager
def without_log_messages(logger_name: str, *fragments: str) -> Iterator[None]:
    """Drop records of `logger_name` whose message contains one of `fragments`, for the block only."""
    logger = logging.getLogger(logger_name)
    dropper = _DropMessages(fragments)
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


# mlflow.transformers looks a local folder up on the hub for a model card and a licence; tidpo always logs
# a local folder it has just written, so both lookups fail by design.
MLFLOW_LOCAL_FOLDER_NOISE = (
    "The model card could not be retrieved from the hub",
    "Unable to find license information for this model",
)
# lm-eval advises `--metadata` for every task built from a local file (a custom_dataset), which is how
# tidpo feeds its offline benchmark data.
LM_EVAL_CUSTOM_DATASET_NOISE = ("Custom kwargs can be passed to `--metadata`",)


def quiet_trainer_output(trainer, postfix: tuple[str, ...] = ("loss",)) -> None:
    """A transformers Trainer (TRL's RewardTrainer, GRPOTrainer) that shows a progress bar with `postfix`
    metrics, instead of printing the dict of every logged metric under it (ProgressCallback.on_log) or,
    without a bar, on its own line (PrinterCallback). The metrics still reach the log history and MLflow."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "train_runtime" not in logs:
                shown = {name: f"{float(logs[name]):.4g}" for name in postfix if name in logs}
                if shown:
                    self.training_bar.set_postfix(**shown)

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress)
