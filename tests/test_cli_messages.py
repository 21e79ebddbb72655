"""What the command line says when the user got something wrong (issue 31): a misspelled run config key, a
rollback to a version that does not exist, and a failed run's closing summary. Each is one clear message
(no Python traceback) with a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from registry_fixtures import registry_with_versions

from tidpo_core import store
from tidpo_core.cli import main as core_main
from tidpo_core.runtime import tracking
from tidpo_core.runtime.errors import UserInputError
from tidpo_pipeline.failures import failure_lines, user_errors_as_failures
from tidpo_pipeline.run import main as run_main

NAME = "tidpo-policy"


def test_a_misspelled_run_config_key_is_named_without_a_traceback(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    config = tmp_path / "my.yaml"
    config.write_text("ops:\n  tidpo_policy:\n    config:\n      lerning_rate: 1.0e-6\n")
    assert run_main(["--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("tidpo run: ")
    assert '"lerning_rate"' in captured.err and "root:ops:tidpo_policy:config" in captured.err
    assert "did you mean 'learning_rate' instead of 'lerning_rate'?" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "tidpo_training" not in captured.out  # no step ran, no closing summary


def test_a_rollback_to_a_missing_version_says_which_exist(tmp_path, capsys) -> None:
    uri = registry_with_versions(tmp_path, 2, NAME)
    tracking.set_champion(uri, 2)
    capsys.readouterr()

    assert core_main(["rollback", "7", "--reason", "x", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert (
        captured.err.strip() == "tidpo rollback: version 7 of 'tidpo-policy' does not exist; versions: 1, 2"
    )
    assert "Traceback" not in captured.err + captured.out
    assert tracking.champion_version(uri) == "2"  # the alias did not move
    database = tmp_path / store.DATABASE_FILE
    if database.exists():  # and no rollback was recorded
        con = store.connect(database, read_only=True)
        try:
            assert store.champion_history(con, NAME) == []
        finally:
            con.close()

    assert core_main(["rollback", "abc", "--reason", "x", "--data-dir", str(tmp_path)]) == 1
    assert "version abc of 'tidpo-policy' does not exist; versions: 1, 2" in capsys.readouterr().err


def test_a_rollback_without_any_version_says_so(tmp_path, capsys) -> None:
    registry_with_versions(tmp_path, 0, NAME)
    assert core_main(["rollback", "1", "--reason", "x", "--data-dir", str(tmp_path)]) == 1
    assert (
        "version 1 of 'tidpo-policy' does not exist; 'tidpo-policy' has no versions yet"
        in capsys.readouterr().err
    )


OFFLINE = (
    "reference model: model 'meta-llama/Llama-3.2-1B' is not available: We couldn't connect to "
    "'https://huggingface.co' to load the files, and couldn't find them in the cached files.\n"
    "Check your internet connection or see how to run the library in offline mode."
)


@dg.asset
def reference_model() -> None:
    with user_errors_as_failures():  # as the pipeline's assets report a UserInputError
        raise UserInputError(OFFLINE, model="meta-llama/Llama-3.2-1B")


@dg.asset(deps=[reference_model])
def anchor_responses() -> None:
    pass


@dg.asset(deps=[anchor_responses])
def tidpo_policy() -> None:
    pass


@dg.asset
def pairs() -> None:
    try:
        Path("/nonexistent/pairs.jsonl").read_text()
    except OSError as exc:
        raise UserInputError("/nonexistent/pairs.jsonl: cannot read the preference pairs") from exc


@dg.asset
def buggy() -> None:
    {}["missing"]


def _failed_run(*assets: dg.AssetsDefinition) -> dg.ExecuteInProcessResult:
    job = dg.Definitions(assets=list(assets)).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(raise_on_error=False)
    assert not result.success
    return result


def test_a_failed_run_names_the_step_its_reason_and_what_to_do() -> None:
    lines = failure_lines(_failed_run(reference_model, anchor_responses, tidpo_policy))
    assert lines == [
        "failed   reference_model: reference model: model 'meta-llama/Llama-3.2-1B' is not available: We couldn't "
        "connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.",
        "         what to do: point `reference_model.model_name_or_path` at a local folder or a GGUF file "
        "(or the short name `smollm2-135m-instruct`), or unset HF_HUB_OFFLINE if this machine has a network",
        "skipped  anchor_responses, tidpo_policy because an upstream step failed",
    ]


def test_a_raised_user_error_shows_its_message_and_a_bug_its_root_error() -> None:
    lines = failure_lines(_failed_run(pairs, buggy))
    assert sorted(lines) == [
        "failed   buggy: KeyError: 'missing'",
        "failed   pairs: /nonexistent/pairs.jsonl: cannot read the preference pairs",
    ]


@dg.asset
def fine() -> int:
    return 1


def test_a_successful_run_has_nothing_to_report() -> None:
    result = (
        dg.Definitions(assets=[fine])
        .resolve_implicit_global_asset_job_def()
        .execute_in_process(raise_on_error=False)
    )
    assert result.success
    assert failure_lines(result) == []
