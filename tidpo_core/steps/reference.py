"""Build the reference model: check a configured checkpoint, or build the embedded tiny model (a tokenizer
trained on the pairs, a small Llama, a short SFT), and record it in MLflow."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tidpo_core import store
from tidpo_core.batching.chat import PROMPT_FORMAT, has_chat_template
from tidpo_core.batching.features import EncodingSettings
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    check_model_available,
    count_parameters,
    load_model_and_tokenizer,
    resolve_model_source,
    resolves_to_import,
    save_model_and_tokenizer,
    train_tokenizer,
)
from tidpo_core.models.sft import sft_texts, supervised_finetune
from tidpo_core.runtime import tracking
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.fingerprint import digest, model_fingerprint
from tidpo_core.runtime.layout import DataDir
from tidpo_core.steps import OpenDb, RunTracking, handle_of, log_to

BUILD_MARKER = "tidpo_build.json"


@dataclass(frozen=True)
class ReferenceRecipe:
    model_name_or_path: str = ""
    """Hub id (e.g. meta-llama/Llama-3.1-8B-Instruct), local HF folder, GGUF file, or a shipped model's short
    name (`smollm2-135m-instruct`); empty builds the embedded tiny model."""
    revision: str | None = None
    trust_remote_code: bool = False
    sft_steps: int = 300
    sft_on: Literal["chosen", "both"] = "both"
    """`both`: the reference learns the language of both answers, so preferring one is left to preference training."""
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class ReferenceHandle:
    """What later stages need of the reference (the reference_model asset's value, as a dict)."""

    path: str
    fingerprint: str
    revision: str | None = None
    trust_remote_code: bool = False
    base: dict[str, Any] = field(default_factory=dict)
    """What the reference starts from (the contrastive importance models fine-tune the same base)."""
    mlflow_run_id: str | None = None

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> ReferenceHandle:
        return handle_of(value, cls)

    def loading(self) -> dict[str, Any]:
        """Arguments of `load_model_and_tokenizer`."""
        return {
            "name_or_path": self.path,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
        }

    def load(self) -> tuple[Any, Any]:
        return load_model_and_tokenizer(**self.loading())

    @property
    def is_pretrained(self) -> bool:
        """A configured checkpoint, not the embedded model built from scratch."""
        return "tiny_config" not in self.base


def with_optimizer_recipe(reference: ReferenceHandle, options: Mapping[str, Any]) -> dict[str, Any]:
    """Training options with `optimizer_recipe: auto` settled by the reference: the paper's recipe for a
    pretrained checkpoint, the scratch recipe for the embedded model (training.config.OPTIMIZER_RECIPES)."""
    out = dict(options)
    if out.get("optimizer_recipe", "auto") == "auto":
        out["optimizer_recipe"] = "paper" if reference.is_pretrained else "scratch"
    return out


@dataclass(frozen=True)
class ReferenceBuilt:
    handle: ReferenceHandle
    sft_losses: list[float]
    parameters: int | None
    """None for a configured checkpoint: its weights are not loaded here."""
    details: dict[str, Any]
    """architecture (a checkpoint) or vocab_size (the embedded model)."""
    reused: bool


def build_reference(
    open_db: OpenDb,
    recipe: ReferenceRecipe,
    tiny: TinyModelConfig,
    layout: DataDir,
    pairs_digest: str,
    *,
    tracking_to: RunTracking | None = None,
    encoding: EncodingSettings = EncodingSettings(),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ReferenceBuilt:
    """The reference for the stored pairs: reused when its folder was built from the same pairs and recipe."""
    if recipe.model_name_or_path:
        built = _checked_checkpoint(recipe, layout.imported_models, log_to(log))
    else:
        built = _embedded_model(
            open_db, recipe, tiny, layout.reference_model, pairs_digest, encoding, progress, log_to(log)
        )
    if tracking_to is None:
        return built
    run_id = tracking.start_run(
        tracking_to.uri,
        tracking_to.experiment_id,
        "reference_model",
        tracking_to.tags,
        {
            **dataclasses.asdict(recipe),
            **dataclasses.asdict(tiny),
            "fingerprint": built.handle.fingerprint,
            "path": built.handle.path,
        },
    )
    tracking.log_metric_series(tracking_to.uri, run_id, "sft/loss", built.sft_losses)
    tracking.finish_run(tracking_to.uri, run_id)
    return dataclasses.replace(built, handle=dataclasses.replace(built.handle, mlflow_run_id=run_id))


def _checked_checkpoint(
    recipe: ReferenceRecipe, imports_dir: Path, log: Callable[[str], None]
) -> ReferenceBuilt:
    # Validate the checkpoint without loading its weights: an 8B model has no business in the
    # orchestrator's memory; the steps that need it load it themselves. A GGUF file (or a shipped model's
    # short name) is the exception: it is converted once into an HF folder that every later step loads.
    try:
        if resolves_to_import(recipe.model_name_or_path):
            log(f"reference model: importing {recipe.model_name_or_path} into {imports_dir} (once per file)")
        source = resolve_model_source(recipe.model_name_or_path, imports_dir)
        model_config = check_model_available(
            source, trust_remote_code=recipe.trust_remote_code, revision=recipe.revision
        )
    except OSError as exc:  # a missing folder or file, an unknown hub id, no network, a wheel not installed
        raise UserInputError(f"reference model: {exc}", model=recipe.model_name_or_path) from None
    chat = _has_template(source)
    fingerprint = model_fingerprint(source, recipe.revision)
    if chat:
        # The encoding is part of the reference's identity: anchors and weights stored for a chat model
        # before prompts were rendered with its template are recomputed, never read against other ids.
        fingerprint = digest({"model": fingerprint, "prompt_format": PROMPT_FORMAT})
    handle = ReferenceHandle(
        path=source,
        fingerprint=fingerprint,
        revision=recipe.revision,
        trust_remote_code=recipe.trust_remote_code,
        base={"path": source, "revision": recipe.revision, "trust_remote_code": recipe.trust_remote_code},
    )
    details = {"architecture": (model_config.architectures or ["?"])[0], "chat_template": chat}
    if source != recipe.model_name_or_path:
        details["imported_from"] = recipe.model_name_or_path
    return ReferenceBuilt(handle, [], None, details, reused=True)


def _has_template(source: str) -> bool:
    """Whether the checkpoint's tokenizer ships a chat template (prompts are rendered with it when it does)."""
    try:
        from transformers import AutoTokenizer

        return has_chat_template(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError):
        return False


def _embedded_model(
    open_db: OpenDb,
    recipe: ReferenceRecipe,
    tiny: TinyModelConfig,
    path: Path,
    pairs_digest: str,
    encoding: EncodingSettings,
    progress: bool,
    log: Callable[[str], None],
) -> ReferenceBuilt:
    build_key = digest(
        {"pairs": pairs_digest, "config": {**dataclasses.asdict(recipe), **dataclasses.asdict(tiny)}}
    )
    marker = path / BUILD_MARKER
    reused = marker.exists() and json.loads(marker.read_text()).get("build_key") == build_key
    if reused:
        log(f"reference model at {path} is up to date; reusing it")
        model, tokenizer = load_model_and_tokenizer(path)
        sft_losses = json.loads(marker.read_text()).get("sft_losses", [])
    else:
        with open_db() as con:
            pairs = store.read_pairs(con, split="train")
        texts = [text for p in pairs for text in (p.prompt, p.chosen, p.rejected)]
        tokenizer = train_tokenizer(texts, vocab_size=tiny.vocab_size)
        model = build_tiny_model(tokenizer, tiny, seed=recipe.seed)
        sft_losses = supervised_finetune(
            model,
            tokenizer,
            sft_texts(pairs, recipe.sft_on),
            steps=recipe.sft_steps,
            batch_size=recipe.sft_batch_size,
            learning_rate=recipe.sft_learning_rate,
            seed=recipe.seed,
            settings=encoding,
            progress=progress,
        )
        # Written beside the old folder and swapped in: a crash never leaves a half-written reference.
        staging = path.with_name(f"{path.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        save_model_and_tokenizer(model, tokenizer, staging)
        (staging / BUILD_MARKER).write_text(json.dumps({"build_key": build_key, "sft_losses": sft_losses}))
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    handle = ReferenceHandle(
        path=str(path),
        fingerprint=model_fingerprint(path),
        base={"tiny_config": dataclasses.asdict(tiny), "seed": recipe.seed},
    )
    return ReferenceBuilt(handle, sft_losses, count_parameters(model), {"vocab_size": len(tokenizer)}, reused)
