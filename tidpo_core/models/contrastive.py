"""The two contrastive models of the `contrastive` importance estimator (docs/method.md section 1, other estimators; TIS-DPO, arXiv
2410.04350, its SFT construction): the reference's base fine-tuned on the chosen answers only (pi_+) and on the
rejected answers only (pi_-), with the same SFT recipe. Tokens where the two disagree are the ones the
preference is about; importance.estimate_importance scores I_t = |log pi_+(y_t) - log pi_-(y_t)|.

The base is what the reference starts from: a hub or local checkpoint as it is, or for the embedded default
the untrained tiny Llama with the reference's tokenizer and seed (the embedded reference is that model after
SFT on both answers, so starting from the reference itself would hand both contrastive models every phrase).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.data.pairs import PreferencePair
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    load_model_and_tokenizer,
    save_model_and_tokenizer,
)
from tidpo_core.models.sft import supervised_finetune

SIDES = {"positive": "chosen", "negative": "rejected"}
BUILD_MARKER = "tidpo_build.json"


SCRATCH_SFT_LEARNING_RATE = 3e-3
PRETRAINED_SFT_LEARNING_RATE = 2e-5


@dataclass(frozen=True)
class ContrastiveSFT:
    """SFT recipe of both contrastive models (defaults: the embedded reference's)."""

    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_learning_rate: float | None = None
    """None: 3e-3 for the embedded model built from scratch (its reference's rate), 2e-5 for a pretrained base,
    which a large rate would wreck (the contrastive_models step settles it by the reference; alone: 3e-3)."""
    seed: int = 0

    def settled(self, pretrained: bool) -> ContrastiveSFT:
        """This recipe with `sft_learning_rate: None` replaced by the rate for a scratch or a pretrained base."""
        if self.sft_learning_rate is not None:
            return self
        return replace(
            self, sft_learning_rate=PRETRAINED_SFT_LEARNING_RATE if pretrained else SCRATCH_SFT_LEARNING_RATE
        )


def load_base(base: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model the reference started from, from the reference_model handle's `base` entry: {"path": ...}
    for a checkpoint, {"tiny_config": {...}, "seed": n} for the embedded tiny model."""
    if "path" in base:
        return load_model_and_tokenizer(
            base["path"],
            revision=base.get("revision"),
            trust_remote_code=base.get("trust_remote_code", False),
        )[0]
    return build_tiny_model(tokenizer, TinyModelConfig(**base["tiny_config"]), seed=int(base["seed"]))


def contrastive_paths(out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / "positive", out_dir / "negative"


def is_built(out_dir: str | Path, build_key: str) -> bool:
    marker = Path(out_dir) / BUILD_MARKER
    return marker.exists() and json.loads(marker.read_text()).get("build_key") == build_key


def train_contrastive_pair(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    out_dir: str | Path,
    *,
    recipe: ContrastiveSFT = ContrastiveSFT(),
    build_key: str = "",
    progress: bool = False,
) -> dict[str, list[float]]:
    """Fine-tune two copies of `base` (chosen answers / rejected answers) and save them under `out_dir`
    (`positive/`, `negative/`); returns the SFT loss curves. The folder appears whole or not at all."""
    if not pairs:
        raise ValueError("the contrastive models need at least one training pair")
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    losses: dict[str, list[float]] = {}
    for name, side in SIDES.items():
        model = copy.deepcopy(base)
        losses[name] = supervised_finetune(
            model,
            tokenizer,
            [(p.prompt, getattr(p, side)) for p in pairs],
            steps=recipe.sft_steps,
            batch_size=recipe.sft_batch_size,
            learning_rate=float(recipe.settled(pretrained=False).sft_learning_rate),  # type: ignore[arg-type]
            seed=recipe.seed,
            progress=progress,
        )
        save_model_and_tokenizer(model, tokenizer, staging / name)
    (staging / BUILD_MARKER).write_text(
        json.dumps({"build_key": build_key, "recipe": asdict(recipe), "sft_losses": losses})
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return losses


def load_contrastive_pair(paths: Sequence[str | Path]) -> tuple[PreTrainedModel, PreTrainedModel]:
    positive, negative = (load_model_and_tokenizer(path)[0].eval() for path in paths)
    return positive, negative
