"""Weigh the tokens: hybrid importance (an importance estimate mixed with the Gaussian prior) and the
reference's log-probs for every chosen, rejected and anchor response, stored once for all training runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tidpo_core import store
from tidpo_core.errors import UserInputError
from tidpo_core.features import EncodingSettings, encode_response, side_texts, token_weights_row
from tidpo_core.fingerprint import digest, model_fingerprint, text_digest
from tidpo_core.importance import compute_token_importance
from tidpo_core.modeling import check_model_available, load_model_and_tokenizer
from tidpo_core.steps import OpenDb, log_to
from tidpo_core.steps.reference import ReferenceHandle


@dataclass(frozen=True)
class WeighingSettings:
    estimator: Literal["attribution", "surprisal", "contrastive"] = "attribution"
    """The raw importance I (METHOD.md 1b): the paper's gradient attribution, the reference's surprisal
    -log pi_ref(y_t), or the contrastive |log pi_+ - log pi_-| of two models (paths below)."""
    exclude_eos: bool = False
    """The end-of-sequence token gets I = 0: it leaves the normalization and keeps the prior's term only."""
    contrastive_positive_path: str = ""
    """estimator contrastive: a model that prefers the chosen answers, with the reference's tokenizer.
    Empty: the newest pair the contrastive_models asset trained for this reference."""
    contrastive_negative_path: str = ""
    """estimator contrastive: a model that prefers the rejected answers (empty: see above)."""
    weight_lambda: float = 0.7
    """lambda of the hybrid weight: 0 is prior only, 1 attribution only (METHOD.md section 1)."""
    normalization: Literal["max", "sum", "softmax"] = "max"
    temperature: float = 1.0
    batch_size: int = 16
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    write_every: int = 512
    """Responses per DuckDB transaction; a crash loses at most one chunk of work."""
    reference_kl_top_k: int = 0
    """Also store the reference's k most likely next tokens per response token (from the same forward),
    so that tidpo_policy with reference_kl: cached computes SeqKL without a reference model. 0: none."""

    @property
    def encoding(self) -> EncodingSettings:
        return EncodingSettings(self.max_prompt_tokens, self.max_response_tokens)


@dataclass(frozen=True)
class WeightsReport:
    fingerprint: str
    importance: dict[str, Any]
    """The settings the fingerprint covers: lambda, normalization, temperature (and the estimator off its default)."""
    computed: int
    expected: int
    summary: store.WeightsSummary


def _contrastive_paths(open_db: OpenDb, reference: ReferenceHandle, settings: WeighingSettings) -> tuple[str, str]:
    paths = (settings.contrastive_positive_path, settings.contrastive_negative_path)
    if not any(paths):
        with open_db() as con:
            paths = store.latest_contrastive_models(con, reference.fingerprint) or ("", "")
    if not all(paths):
        raise UserInputError(
            "estimator contrastive needs two contrastive models: materialize the contrastive_models asset first, "
            "or set contrastive_positive_path and contrastive_negative_path"
        )
    for path in paths:
        try:
            check_model_available(path)
        except OSError as exc:
            raise UserInputError(f"contrastive model: {exc}", model=path) from None
    return paths


def weights_identity(open_db: OpenDb, reference: ReferenceHandle, settings: WeighingSettings) -> tuple[str, dict[str, Any], tuple[str, str]]:
    """(fingerprint, the importance settings it covers, the contrastive model paths if any)."""
    if settings.reference_kl_top_k < 0:
        raise UserInputError(f"reference_kl_top_k must be >= 0, got {settings.reference_kl_top_k}")
    importance: dict[str, Any] = {"lambda": settings.weight_lambda, "normalization": settings.normalization, "temperature": settings.temperature}
    if settings.estimator != "attribution" or settings.exclude_eos:
        # Only off the default, so that weights stored before estimators existed keep their fingerprint.
        importance |= {"estimator": settings.estimator, "exclude_eos": settings.exclude_eos}
    contrastive = ("", "")
    if settings.estimator == "contrastive":
        contrastive = _contrastive_paths(open_db, reference, settings)
        importance["contrastive_models"] = [model_fingerprint(path) for path in contrastive]
    fingerprint = digest(
        {
            "model": reference.fingerprint,
            "encoding": settings.encoding.__dict__,
            "importance": importance,
            # Only when set, so that weights stored before the option existed keep their fingerprint.
            **({"reference_kl_top_k": settings.reference_kl_top_k} if settings.reference_kl_top_k else {}),
        }
    )
    return fingerprint, importance, contrastive


def weigh_tokens(
    open_db: OpenDb,
    reference: ReferenceHandle,
    anchors_fingerprint: str | None,
    settings: WeighingSettings,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> WeightsReport:
    """Weights for every train response (chosen, rejected and, with anchors, the anchor) that has none under
    these settings yet; a re-run computes only what is missing."""
    fingerprint, importance, contrastive_paths = weights_identity(open_db, reference, settings)
    with open_db() as con:
        pairs = store.read_pairs(con, split="train")
        anchors = store.read_anchors(con, anchors_fingerprint) if anchors_fingerprint else {}
        existing = store.existing_weight_keys(con, fingerprint)
    wanted = [
        ((pair.pair_id, side, text_digest(text)), pair.prompt, text)
        for pair in pairs
        for side, text in side_texts(pair, anchors.get(pair.pair_id)).items()
    ]
    todo = [item for item in wanted if item[0] not in existing]
    log_to(log)(f"{len(todo)} responses to weigh, {len(wanted) - len(todo)} reused")
    if todo:
        model, tokenizer = reference.load()
        contrastive = None
        if settings.estimator == "contrastive":
            contrastive = tuple(load_model_and_tokenizer(path)[0] for path in contrastive_paths)
        for start in range(0, len(todo), settings.write_every):
            part = todo[start : start + settings.write_every]
            encoded = [encode_response(tokenizer, prompt, text, settings.encoding) for _, prompt, text in part]
            importances = compute_token_importance(
                model,
                encoded,
                lambda_=settings.weight_lambda,
                normalization=settings.normalization,
                temperature=settings.temperature,
                batch_size=settings.batch_size,
                progress=progress,
                reference_topk=settings.reference_kl_top_k,
                estimator=settings.estimator,
                exclude_eos=settings.exclude_eos,
                eos_token_id=tokenizer.eos_token_id,
                contrastive_models=contrastive,
            )
            rows = [token_weights_row(*key, enc, imp) for (key, _, _), enc, imp in zip(part, encoded, importances, strict=True)]
            with open_db() as con:
                store.write_token_weights(con, fingerprint, rows)
    with open_db() as con:
        summary = store.weights_summary(con, fingerprint)
    return WeightsReport(fingerprint, importance, len(todo), len(wanted), summary)
