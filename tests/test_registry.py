"""The champion alias as a shared resource: compare-and-set promotion, refusals, history and rollback,
round-tripped through a real MLflow sqlite registry (versions registered without model files: the alias
logic does not read them)."""

import multiprocessing
from pathlib import Path

import pytest
from registry_fixtures import registry_with_versions

from tidpo_core import store
from tidpo_core.cli import main
from tidpo_core.runtime import tracking

NAME = "tidpo-policy"


@pytest.fixture()
def registry(tmp_path: Path) -> tuple[str, Path]:
    return registry_with_versions(tmp_path, 3, NAME), tmp_path


def test_promotion_is_compare_and_set(registry) -> None:
    uri, data_dir = registry
    assert tracking.promote_if_champion_is(uri, 1, None, data_dir) == (True, None)
    # Judged against "no champion", but v1 took the alias meanwhile: refused, and the finder is told.
    assert tracking.promote_if_champion_is(uri, 2, None, data_dir) == (False, "1")
    assert tracking.champion_version(uri) == "1"
    assert tracking.promote_if_champion_is(uri, 2, "1", data_dir) == (True, "1")
    assert tracking.champion_version(uri) == "2"


def _race(uri: str, data_dir: str, version: int, start, results) -> None:
    start.wait()
    moved, _ = tracking.promote_if_champion_is(uri, version, "1", data_dir)
    results.put((version, moved))


def test_two_challengers_finishing_together_cannot_both_become_champion(registry) -> None:
    uri, data_dir = registry
    tracking.set_champion(uri, 1)
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    racers = [spawn.Process(target=_race, args=(uri, str(data_dir), v, start, results)) for v in (2, 3)]
    for p in racers:
        p.start()
    for p in racers:
        p.join(timeout=120)
    outcome = dict(results.get(timeout=5) for _ in racers)
    assert sorted(outcome.values()) == [False, True]  # exactly one moved the alias
    winner = next(v for v, moved in outcome.items() if moved)
    assert tracking.champion_version(uri) == str(winner)


def test_rollback_history_and_the_verdict_tags_round_trip(registry, capsys) -> None:
    uri, data_dir = registry
    tracking.set_champion(uri, 2)
    tracking.tag_gate_verdict(uri, 3, False, "reference, champion v2", "failed: worse than the champion")
    con = store.connect(data_dir / store.DATABASE_FILE)
    store.record_champion_event(con, store.ChampionEvent(NAME, "2", "promoted", None, "reference", "passed"))
    store.record_champion_event(
        con, store.ChampionEvent(NAME, "3", "refused", "2", "reference, champion v2", "failed: worse")
    )
    con.close()
    assert main(["rollback", "1", "--reason", "v2 answers in French", "--data-dir", str(data_dir)]) == 0
    assert "version 1 (was 2)" in capsys.readouterr().out
    info = tracking.champion(uri)
    assert info.version == "1" and info.tags["rollback_reason"] == "v2 answers in French"
    assert tracking.client(uri).get_model_version(NAME, "3").tags == {
        "gate": "failed",
        "compared_with": "reference, champion v2",
        "gate_verdict": "failed: worse than the champion",
    }
    assert main(["champion", "--history", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[2:4] for line in lines] == [
        ["v2", "promoted"],
        ["v3", "refused"],
        ["v1", "rollback"],
    ]
    assert lines[-1].endswith("(champion before: v2)  v2 answers in French")
    with pytest.raises(Exception, match="9"):  # an unknown version fails before the alias moves
        tracking.rollback_champion(uri, 9, "typo", data_dir)
    assert tracking.champion_version(uri) == "1"
