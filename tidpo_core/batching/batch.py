"""A collated preference batch, typed: the pairs' ids and, per side, its padded tensors.

features.TrainingCollator builds it and features.stack_sides reads it for the forward
(tidpo_core.training.forward). Before collation a pair is a row of flat columns (the datasets.Dataset
the engine trains from: ``pair_id``, ``chosen_input_ids``, ``rejected_reference_logps``, ...);
`column_name` is the one place that names them, and TrainingBatch.of turns collated columns into a batch.

It has a ``to(device, non_blocking=...)``, which is what accelerate's prepared data loader
(``send_to_device``) calls on a batch that has one, so the loader still moves it to the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SideBatch:
    """One side (chosen, rejected or anchor) of a batch: ``[B, T]`` tensors, right-padded."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    weights: Tensor
    """Token weights at the response positions, 0 elsewhere."""
    reference_logps: Tensor | None = None
    """The reference's stored per-token log-probs (0 off the response); None: a reference forward gives them."""
    reference_topk_ids: Tensor | None = None
    """``[B, T, k]`` the reference's cached top-k next tokens (reference_kl: cached; chosen and rejected only)."""
    reference_topk_logp: Tensor | None = None
    """``[B, T, k]`` their log-probabilities (-inf off the response)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SideBatch:
        return SideBatch(
            **{
                f.name: None
                if (value := getattr(self, f.name)) is None
                else value.to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )


SIDE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SideBatch))
_REQUIRED_FIELDS = ("input_ids", "attention_mask", "response_mask", "weights")


def column_name(side: str, field_name: str) -> str:
    """A side's feature column in a pair's row, e.g. ``chosen_input_ids``."""
    return f"{side}_{field_name}"


@dataclass(frozen=True, eq=False)
class TrainingBatch:
    """The pairs of one micro-batch: their ids, and each side's tensors (rows in the order of `pair_ids`)."""

    pair_ids: list[str]
    sides: dict[str, SideBatch]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrainingBatch:
        return TrainingBatch(
            list(self.pair_ids), {name: side.to(device, non_blocking) for name, side in self.sides.items()}
        )

    def with_side(self, name: str, side: SideBatch) -> TrainingBatch:
        """This batch with side `name` replaced."""
        return replace(self, sides={**self.sides, name: side})

    def without_reference_logps(self) -> TrainingBatch:
        """This batch with no stored reference log-probs: a reference forward gives them."""
        return replace(
            self, sides={name: replace(side, reference_logps=None) for name, side in self.sides.items()}
        )

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> TrainingBatch:
        """`batch` itself, or a TrainingBatch from collated columns (`column_name`, ``pair_id``); a column
        that is neither is refused rather than silently left out."""
        if isinstance(batch, TrainingBatch):
            return batch
        suffix = "_input_ids"
        names = [key[: -len(suffix)] for key in batch if key.endswith(suffix)]
        sides = {}
        for name in names:
            present = {f: batch[column_name(name, f)] for f in SIDE_FIELDS if column_name(name, f) in batch}
            missing = [f for f in _REQUIRED_FIELDS if f not in present]
            if missing:
                raise ValueError(f"side {name!r} of the batch has no {', '.join(missing)}")
            sides[name] = SideBatch(**present)
        known = {"pair_id"} | {column_name(name, f) for name in names for f in SIDE_FIELDS}
        unknown = sorted(set(batch) - known)
        if unknown:
            raise ValueError(f"not fields of a training batch: {unknown}")
        return cls(list(batch.get("pair_id", [])), sides)
