"""The whole graph materializes in-process on a small config; checks pass; re-runs are idempotent;
the registry round trip works; broken inputs make the matching check fail."""

import json
import logging
import os
import re
import warnings

import dagster as dg
import mlflow
import pytest
from pipeline_config import small_run_config

from tidpo_core import store
from tidpo_core.runtime import tracking
from tidpo_pipeline.checks import ALL_CHECKS, pairs_are_valid
from tidpo_pipeline.definitions import ASSETS, defs
from tidpo_pipeline.resources import build_resources


def _materialize(data_dir, run_config, selection=None, instance=None):
    return dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=build_resources(str(data_dir)),
        run_config=run_config,
        instance=instance,
        selection=selection,
        raise_on_error=False,
    )


def _pairs_only() -> dict:
    return {"ops": {"preference_pairs": small_run_config()["ops"]["preference_pairs"]}}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tidpo")
    # The run starts in an empty folder: whatever it (or the training process it launches) writes
    # relative to the working directory instead of into the data dir shows up there.
    workdir = tmp_path_factory.mktemp("working_directory")
    instance = dg.DagsterInstance.ephemeral()
    noise = _RecordMessages()
    loggers = [logging.getLogger(name) for name in ("mlflow.transformers", "lm_eval.api.task")]
    for logger in loggers:
        logger.addHandler(noise)
    previous_cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _materialize(data_dir, small_run_config(with_reward_model=True), instance=instance)
    finally:
        os.chdir(previous_cwd)
        for logger in loggers:
            logger.removeHandler(noise)
    FIRST_RUN_NOISE.extend([*noise.messages, *(f"{w.category.__name__}: {w.message}" for w in caught)])
    WRITTEN_OUTSIDE_DATA_DIR.extend(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    return data_dir, instance, result


FIRST_RUN_NOISE: list[str] = []
WRITTEN_OUTSIDE_DATA_DIR: list[str] = []


def test_a_run_writes_nothing_outside_the_data_dir(first_run):
    # A run once left an empty mlflow.db in the working directory (MLflow's default store).
    data_dir, _, result = first_run
    assert result.success
    assert WRITTEN_OUTSIDE_DATA_DIR == []
    assert (data_dir / store.DATABASE_FILE).exists() and (data_dir / tracking.STORE_FILE).exists()


class _RecordMessages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _counts(data_dir):
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        return {
            table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in (
                "preference_pairs",
                "quarantine",
                "anchor_responses",
                "token_weights",
                "evaluation_metrics",
            )
        }
    finally:
        con.close()


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)  # what `dagster dev` does: names unique, jobs resolvable
    assert {a.key.to_user_string() for a in ASSETS} == {
        "preference_pairs",
        "reference_model",
        "reward_model",
        "anchor_responses",
        "token_weights",
        "tidpo_policy",
        "evaluation",
    }
    assert defs.resolve_job_def("tidpo_training") is not None
    assert defs.resolve_schedule_def("weekly_retraining").default_status == dg.DefaultScheduleStatus.STOPPED


def test_policy_config_hands_its_training_fields_to_the_engine_with_the_engine_s_defaults():
    import dataclasses

    from tidpo_core.training import TrainConfig
    from tidpo_pipeline.assets.policy import PolicyConfig, training_fields

    engine = {f.name: f for f in dataclasses.fields(TrainConfig)}
    fields = training_fields(PolicyConfig())
    assert set(fields) <= set(engine), set(fields) - set(engine)
    for name, value in fields.items():
        default = (
            engine[name].default_factory()
            if engine[name].default_factory is not dataclasses.MISSING
            else engine[name].default
        )
        assert value == default, name
    config = TrainConfig(
        duckdb_path="x",
        reference_model_path="r",
        output_dir="o",
        **training_fields(PolicyConfig(lora=True, alpha=0.0, seed=7)),
    )
    assert (config.lora, config.alpha, config.seed) == (True, 0.0, 7)


def test_whole_graph_materializes_and_every_check_passes(first_run):
    data_dir, _, result = first_run
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert set(checks) == {
        "pairs_are_valid",
        "quarantine_share_below_limit",
        "anchors_cover_train_pairs",
        "token_weights_are_valid",
        "training_is_healthy",
        "evaluation_gate",
        "reward_model_beats_chance",
    }
    # The reward model's check judges 7 eval pairs here, where one pair moves accuracy by 0.14: its verdict
    # is the check's own arithmetic on what the asset measured (its quality is tested on 230 pairs in
    # test_reward.py).
    reward_check = next(
        c for c in result.get_asset_check_evaluations() if c.check_name == "reward_model_beats_chance"
    )
    accuracy, threshold = (
        reward_check.metadata["held_out_accuracy"].value,
        reward_check.metadata["threshold"].value,
    )
    assert 0.0 <= accuracy <= 1.0 and reward_check.passed == (accuracy > threshold)
    assert all(passed for name, passed in checks.items() if name != "reward_model_beats_chance"), checks
    from tidpo_pipeline.run import gate_verdict

    assert gate_verdict(result).startswith("gate passed: version 1 is the new champion (")
    # Known third-party noise is silenced at its source, narrowly (tidpo_core.runtime.quiet, the explicit io_manager).
    for known in (
        "Custom kwargs can be passed",
        "model card could not be retrieved",
        "license information",
        "PipesMessageReader.expected_writer_count",
        "SupersessionWarning",
    ):
        assert not [m for m in FIRST_RUN_NOISE if known in m], known
    # The evaluation's metadata: a short summary, the key metrics rounded, the rest grouped (not ~140 floats).
    evaluation = result.asset_materializations_for_node("evaluation")[0].metadata
    assert (
        evaluation["summary"].value == "**Gate passed** (compared with reference): version 1 is the champion."
    )
    assert evaluation["key_metrics"].value.startswith("| metric | policy | reference | policy - reference |")
    assert {
        "metrics: preference",
        "metrics: importance",
        "metrics: generation",
        "metrics: benchmarks",
    } <= set(evaluation)
    # The key metrics as numbers (at most 6), and the sampled KL's standard error beside the KL.
    assert sum(isinstance(v, dg.FloatMetadataValue) for v in evaluation.values()) <= 7
    assert "policy/kl_to_reference_stderr" in evaluation
    assert "±" in next(
        line
        for line in evaluation["key_metrics"].value.splitlines()
        if line.startswith("| kl_to_reference |")
    )
    pairs_preview = result.asset_materializations_for_node("preference_pairs")[0].metadata["preview"].value
    assert "chosen (where it differs)" in pairs_preview and "user: " in pairs_preview
    counts = _counts(data_dir)
    assert counts["preference_pairs"] == 48
    assert counts["anchor_responses"] > 0 and counts["token_weights"] > 0
    # The default evaluation runs the built-in benchmark samples for both models, side by side.
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        scored = con.execute(
            "SELECT model, metric, value FROM evaluation_metrics WHERE metric IN ('truthfulqa_mc1', 'truthfulqa_mc2', 'ifeval_prompt_strict')"
        ).fetchall()
    finally:
        con.close()
    assert {(m, k) for m, k, _ in scored} == {
        (m, k)
        for m in ("reference", "policy")
        for k in ("truthfulqa_mc1", "truthfulqa_mc2", "ifeval_prompt_strict")
    }
    assert all(0.0 <= v <= 1.0 for *_, v in scored)


def test_registry_round_trip_champion_generates(first_run):
    data_dir, _, result = first_run
    uri = tracking.sqlite_tracking_uri(data_dir)
    info = tracking.champion(uri)
    assert info is not None and info.version == "1"
    assert any(k.startswith("eval/policy/") for k in info.metrics)
    mlflow.set_tracking_uri(uri)
    pipe = mlflow.transformers.load_model(info.model_uri)
    text = pipe("\n\nHuman: How should I treat a burn?\n\nAssistant:", max_new_tokens=8, do_sample=False)
    assert isinstance(text[0]["generated_text"], str) and len(text[0]["generated_text"]) > 0
    run = mlflow.MlflowClient(uri).get_run(info.run_id)
    assert run.data.tags["dagster.asset_key"] == "tidpo_policy"
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["preference_pairs/train"]
    assert "loss" in run.data.metrics and "rewards/accuracies" in run.data.metrics


def test_rematerialization_is_idempotent_and_reuses_work(first_run):
    data_dir, instance, _ = first_run
    before = _counts(data_dir)
    again = _materialize(data_dir, small_run_config(with_reward_model=True), instance=instance)
    assert again.success
    after = _counts(data_dir)
    for table in ("preference_pairs", "quarantine", "anchor_responses", "token_weights"):
        assert after[table] == before[table], table
    meta = {
        m.asset_key.to_user_string(): m.metadata
        for m in again.asset_materializations_for_node("anchor_responses")
        + again.asset_materializations_for_node("token_weights")
    }
    assert meta["anchor_responses"]["generated"].value == 0
    assert meta["token_weights"]["computed"].value == 0
    assert meta["token_weights"]["reused"].value > 0
    reward = again.asset_materializations_for_node("reward_model")[0].metadata
    assert (
        reward["reused"].value is True and reward["registered_version"].value == "1"
    )  # same run, same version


def test_broken_pairs_make_the_pairs_check_fail(first_run, tmp_path):
    data_dir = tmp_path / "broken"
    good = _materialize(data_dir, _pairs_only(), selection=["preference_pairs"])
    assert good.success
    con = store.connect(data_dir / store.DATABASE_FILE)
    con.execute(
        "UPDATE preference_pairs SET rejected = chosen WHERE pair_id = (SELECT min(pair_id) FROM preference_pairs)"
    )
    con.close()
    result = dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=build_resources(str(data_dir)),
        selection=dg.AssetSelection.checks(pairs_are_valid),
        raise_on_error=False,
    )
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["pairs_are_valid"] is False


def test_quarantine_share_check_fails_on_a_mostly_bad_file(tmp_path):
    data_dir = tmp_path / "bad"
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 5 + [
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    ]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    config = {"ops": {"preference_pairs": {"config": {"source": str(bad)}}}}
    result = _materialize(data_dir, config, selection=dg.AssetSelection.assets("preference_pairs"))
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks.get("quarantine_share_below_limit") is False


def test_a_file_that_is_not_data_fails_clearly_and_changes_nothing(tmp_path):
    data_dir = tmp_path / "junk"
    assert _materialize(data_dir, _pairs_only(), selection=["preference_pairs"]).success
    before = _counts(data_dir)
    junk = tmp_path / "junk.jsonl.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    result = _materialize(
        data_dir,
        {"ops": {"preference_pairs": {"config": {"source": str(junk)}}}},
        selection=["preference_pairs"],
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    assert "junk.jsonl.gz" in failure.message or "junk.jsonl.gz" in str(failure.cause)
    assert _counts(data_dir) == before


def _stored_digests(data_dir) -> tuple[str, str]:
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        return (
            store.table_digest(
                con,
                "SELECT pair_id, prompt, chosen, rejected, source, split, meta_json FROM preference_pairs",
            ),
            store.table_digest(con, "SELECT source, line_1based, reason, detail FROM quarantine"),
        )
    finally:
        con.close()


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("empty.jsonl", "", "empty.jsonl: no rows"),
        ("blank.jsonl", "\n  \n\n", "blank.jsonl: no rows, 3 blank lines skipped"),
        (
            "invalid.jsonl",
            '{"prompt": "p", "chosen": "same", "rejected": "same"}\n{"nope": 1}\n',
            "invalid.jsonl: no valid rows, 2 quarantined (chosen_equals_rejected 1, unrecognized_format 1)",
        ),
    ],
)
def test_a_source_without_a_valid_row_fails_and_keeps_the_stored_pairs(tmp_path, name, content, says):
    data_dir = tmp_path / "data"
    assert _materialize(data_dir, _pairs_only(), selection=["preference_pairs"]).success
    before = _stored_digests(data_dir)
    assert int(before[0].split("-")[0]) > 0
    source = tmp_path / name
    source.write_text(content)
    result = _materialize(
        data_dir,
        {"ops": {"preference_pairs": {"config": {"source": str(source)}}}},
        selection=["preference_pairs"],
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    assert says in failure.message and "the stored pairs are unchanged" in failure.message
    assert _stored_digests(data_dir) == before


def test_every_line_of_a_source_is_accounted_for(tmp_path):
    source = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b"}),
        "",
        json.dumps({"prompt": "p2", "chosen": "same", "rejected": "same"}),
        "   ",
        json.dumps({"prompt": "p3", "chosen": "c", "rejected": "d"}),
    ]
    source.write_text("\n".join(lines) + "\n")
    result = _materialize(
        tmp_path / "data",
        {"ops": {"preference_pairs": {"config": {"source": str(source)}}}},
        selection=["preference_pairs"],
    )
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    values = {k: getattr(v, "value", v) for k, v in metadata.items()}
    assert (values["rows_read"], values["accepted"], values["quarantined"], values["skipped"]) == (5, 2, 1, 2)
    assert values["skipped_reasons"] == {"blank_line": 2}
    assert "| pairs.jsonl | 3 | chosen_equals_rejected |" in values["quarantine_preview"]


def test_cli_prints_the_champion(first_run, capsys):
    from tidpo_core.cli import main

    data_dir, _, _ = first_run
    expected = tracking.champion(tracking.sqlite_tracking_uri(data_dir))
    assert main(["champion", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "models:/tidpo-policy@champion" in out and f"version {expected.version}" in out
    # The key metrics, policy beside reference, rounded; the tracking URI is absolute (usable from anywhere).
    policy, reference = (
        expected.metrics["eval/policy/reward_accuracy"],
        expected.metrics["eval/reference/reward_accuracy"],
    )
    assert re.search(rf"held-out reward accuracy +{policy:.3f} +{reference:.3f}\n", out)
    kl, stderr = (
        expected.metrics["eval/policy/kl_to_reference"],
        expected.metrics["eval/policy/kl_to_reference_stderr"],
    )
    assert re.search(rf"KL to the reference \(nats\) +{kl:.3f} ± {stderr:.3f} ", out)
    assert f"tracking   sqlite:///{data_dir.resolve()}/{tracking.STORE_FILE}" in out
    assert main(["champion", "--data-dir", str(data_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == expected.version and info["metrics"]["eval/gate_passed"] == 1.0
    # The gate's comparison side by side; a champion's column exactly when it was judged against one.
    judged_against_a_champion = "champion" in info["tags"]["compared_with"]
    assert set(info["evaluation"]) == {"policy", "reference"} | (
        {"champion"} if judged_against_a_champion else set()
    )
    assert (
        info["evaluation"]["policy"]["reward_accuracy"] == policy
        and info["evaluation"]["reference"]["reward_accuracy"] == reference
    )


def test_cli_generate_prints_only_the_champion_s_completion(first_run, capsys):
    from tidpo_core.cli import main
    from tidpo_core.models.generation import SamplingSettings, sample_responses
    from tidpo_core.models.modeling import load_model_and_tokenizer

    data_dir, _, result = first_run
    prompt = "\n\nHuman: How should I treat a burn?\n\nAssistant:"
    assert (
        main(["generate", prompt, "--data-dir", str(data_dir), "--max-new-tokens", "12", "--seed", "5"]) == 0
    )
    out = capsys.readouterr().out.strip()
    # The same sampling on the champion's own training output, loaded without MLflow.
    champion_path = result.asset_materializations_for_node("tidpo_policy")[0].metadata["model_path"].value
    model, tokenizer = load_model_and_tokenizer(champion_path)
    settings = SamplingSettings(max_new_tokens=12, temperature=0.8, seed=5, batch_size=1)
    assert out == sample_responses(model, tokenizer, [prompt], settings)[0].strip()
    assert "Human:" not in out  # the prompt is not echoed


def test_cli_without_champion_says_so(tmp_path, capsys):
    from tidpo_core.cli import main

    # A data dir that does not exist is reported, and left uncreated (sqlite would create it).
    missing = tmp_path / "elsewhere" / ".tidpo"
    assert main(["champion", "--data-dir", str(missing)]) == 1
    assert f"no tidpo data at {missing}" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    tracking.client(tracking.sqlite_tracking_uri(tmp_path)).search_experiments()  # a store without a model
    assert main(["champion", "--data-dir", str(tmp_path)]) == 1
    assert "no champion" in capsys.readouterr().err


def test_inbox_sensor_requests_a_run_for_new_files_only(tmp_path):
    from tidpo_pipeline.definitions import new_preference_data
    from tidpo_pipeline.resources import TidpoStorage

    storage = TidpoStorage(data_dir=str(tmp_path))
    (storage.inbox_dir / "notes.txt").write_text("not data")
    with dg.build_sensor_context(resources={"storage": storage}) as context:
        first = new_preference_data(context)
        assert not first.run_requests
        (storage.inbox_dir / "new.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
        context.update_cursor(first.cursor)
        second = new_preference_data(context)
        assert len(second.run_requests) == 1 and "new.jsonl" in second.run_requests[0].run_key
        context.update_cursor(second.cursor)
        third = new_preference_data(context)
        assert not third.run_requests


def test_cached_reference_kl_through_the_assets(first_run):
    """token_weights with reference_kl_top_k stores the reference top-k; tidpo_policy with
    reference_kl: cached trains from it (no reference model in the training process)."""
    data_dir, instance, _ = first_run
    config = small_run_config(steps=4, reference_kl="cached", register_model=False)
    config["ops"]["token_weights"]["config"]["reference_kl_top_k"] = 16
    config = {"ops": {op: config["ops"][op] for op in ("token_weights", "tidpo_policy")}}
    result = _materialize(data_dir, config, selection=["token_weights", "tidpo_policy"], instance=instance)
    assert result.success
    weights = result.asset_materializations_for_node("token_weights")[0].metadata
    assert weights["reference_kl_top_k"].value == 16 and weights["computed"].value > 0
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        lengths = con.execute(
            "SELECT min(len(reference_topk_ids)), max(len(reference_topk_logp)), count(*) FROM token_weights "
            "WHERE fingerprint = ? AND side <> 'anchor'",
            [weights["fingerprint"].value],
        ).fetchone()
        anchors_without_cache = con.execute(
            "SELECT count(*) FILTER (reference_topk_ids IS NULL), count(*) FROM token_weights "
            "WHERE fingerprint = ? AND side = 'anchor'",
            [weights["fingerprint"].value],
        ).fetchone()
    finally:
        con.close()
    assert lengths[:2] == (16, 16) and 0 < lengths[2] < weights["dagster/row_count"].value
    assert anchors_without_cache[0] == anchors_without_cache[1] > 0  # SeqKL never reads an anchor's cache
    policy = result.asset_materializations_for_node("tidpo_policy")[0].metadata
    assert policy["mlflow_model_uri"].value == "not registered"
    assert 0 < policy["last_loss"].value < 10


def test_cached_reference_kl_without_a_stored_cache_fails_before_training(first_run):
    data_dir, instance, _ = first_run
    config = small_run_config(steps=2, reference_kl="cached", register_model=False)
    config = {"ops": {op: config["ops"][op] for op in ("token_weights", "tidpo_policy")}}
    result = _materialize(data_dir, config, selection=["token_weights", "tidpo_policy"], instance=instance)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and "reference_kl_top_k > 0" in str(failures[0].event_specific_data.error)


def test_contrastive_estimator_through_the_assets(first_run):
    """token_weights with estimator: contrastive fails by name until contrastive_models has trained the pair;
    then it weighs with it, under a fingerprint of its own, and a second contrastive_models run reuses the pair."""
    from tidpo_pipeline.assets.contrastive import contrastive_models

    data_dir, instance, _ = first_run
    weights_config = {**small_run_config()["ops"]["token_weights"]["config"], "estimator": "contrastive"}

    def materialize(selection, ops):
        return dg.materialize(
            [*ASSETS, contrastive_models, *ALL_CHECKS],
            resources=build_resources(str(data_dir)),
            run_config={"ops": ops},
            instance=instance,
            selection=selection,
            raise_on_error=False,
        )

    refused = materialize(["token_weights"], {"token_weights": {"config": weights_config}})
    assert not refused.success
    failures = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialize the contrastive_models asset first" in str(failures[0].event_specific_data.error)

    pair_config = {"config": {"sft_steps": 8, "sft_batch_size": 8}}
    result = materialize(
        ["contrastive_models", "token_weights"],
        {"contrastive_models": pair_config, "token_weights": {"config": weights_config}},
    )
    assert result.success
    pair = result.asset_materializations_for_node("contrastive_models")[0].metadata
    assert pair["reused"].value is False
    weights = result.asset_materializations_for_node("token_weights")[0].metadata
    assert weights["estimator"].value == "contrastive" and weights["computed"].value > 0
    default_fingerprint = (
        first_run[2].asset_materializations_for_node("token_weights")[0].metadata["fingerprint"].value
    )
    assert weights["fingerprint"].value != default_fingerprint
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        stats = con.execute(
            "SELECT count(*), min(attribution), max(attribution), avg(weight) FROM token_weights WHERE fingerprint = ?",
            [weights["fingerprint"].value],
        ).fetchone()
    finally:
        con.close()
    assert stats[0] > 0 and stats[1] >= 0 < stats[2] and stats[3] == pytest.approx(1.0, abs=1e-3)
    again = materialize(["contrastive_models"], {"contrastive_models": pair_config})
    assert again.asset_materializations_for_node("contrastive_models")[0].metadata["reused"].value is True


def test_run_takes_a_dagster_run_config_file(tmp_path):
    from tidpo_pipeline.run import run_config_for

    config = tmp_path / "my.yaml"
    config.write_text(
        "ops:\n  preference_pairs:\n    config:\n      source: /data/mine.jsonl\n      max_chars: 5000\n"
    )
    run_config = run_config_for(str(config), str(tmp_path / "docs"))
    assert run_config["ops"]["preference_pairs"]["config"] == {
        "source": "/data/mine.jsonl",
        "max_chars": 5000,
    }
    assert run_config["ops"]["evaluation"]["config"]["docs_dir"] == str(tmp_path / "docs")
    assert run_config["loggers"]["console"]["config"]["log_level"] == "INFO"
    # The config is what `dagster job execute -c` takes: Dagster validates it against the job.
    from tidpo_pipeline.definitions import defs, tidpo_training

    job = defs.resolve_job_def(tidpo_training.name)
    assert (
        dg.validate_run_config(job, run_config)["ops"]["preference_pairs"]["config"]["source"]
        == "/data/mine.jsonl"
    )
    listed = tmp_path / "list.yaml"
    listed.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        run_config_for(str(listed), "")


def test_tidpo_dispatches_run_to_the_pipeline_and_the_rest_to_the_core(tmp_path, capsys, monkeypatch):
    import tidpo_pipeline.run
    from tidpo_pipeline.cli import main

    called = []
    monkeypatch.setattr(tidpo_pipeline.run, "main", lambda argv: called.append(argv) or 0)
    assert main(["run", "--config", "my.yaml"]) == 0 and called == [["--config", "my.yaml"]]
    assert main(["champion", "--data-dir", str(tmp_path)]) == 1
    assert "no tidpo data" in capsys.readouterr().err
