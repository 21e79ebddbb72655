"""The sharded precompute (tidpo_core.runtime.precompute) of anchors and token weights: one process and two
processes store the same rows bit for bit; a rank killed mid-shard leaves its finished shards for the
re-run and its half-written file unread; a missing or corrupt shard fails naming it and loads nothing;
the assets launch their ranks through Dagster Pipes and say what they did."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from tidpo_core import store
from tidpo_core.data.pairs import LoadResult
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.models.generation import SamplingSettings
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    save_model_and_tokenizer,
    train_tokenizer,
)
from tidpo_core.runtime import precompute
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.faults import planted
from tidpo_core.runtime.fingerprint import model_fingerprint
from tidpo_core.runtime.layout import DataDir, ShardDir
from tidpo_core.runtime.precompute import PrecomputeFailed, PrecomputeSettings, ShardPlan
from tidpo_core.steps import database_at
from tidpo_core.steps.anchors import sample_anchors
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

PAIRS = 24
# 24 pairs in batches of 4, one batch per shard: 6 anchor shards; 72 responses in batches of 8: 9 weight shards.
SAMPLING = SamplingSettings(max_new_tokens=8, batch_size=4, max_prompt_tokens=64)
WEIGHING = WeighingSettings(batch_size=8, max_prompt_tokens=64, max_response_tokens=64)
ONE_BATCH_PER_SHARD = {"batches_per_shard": 1}
TINY = TinyModelConfig(
    vocab_size=400,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def in_process() -> PrecomputeSettings:
    return PrecomputeSettings(launcher="in_process", **ONE_BATCH_PER_SHARD)


def two_processes() -> PrecomputeSettings:
    return PrecomputeSettings(launcher="accelerate", num_processes=2, **ONE_BATCH_PER_SHARD)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, ReferenceHandle]:
    """A data dir with PAIRS train pairs and a tiny reference model (no anchors, no weights)."""
    root = tmp_path_factory.mktemp("precompute_base")
    pairs = generate_synthetic_pairs(PAIRS, seed=3)
    con = store.connect(DataDir.at(root).database)
    try:
        store.replace_pairs(con, LoadResult(list(pairs), [], len(pairs)), eval_fraction=0.0)
    finally:
        con.close()
    tokenizer = train_tokenizer(
        [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=TINY.vocab_size
    )
    path = save_model_and_tokenizer(build_tiny_model(tokenizer, TINY, seed=0), tokenizer, root / "reference")
    return root, ReferenceHandle(str(path), model_fingerprint(path))


def fresh_data_dir(base: tuple[Path, ReferenceHandle], target: Path) -> DataDir:
    """A copy of the base data dir's DuckDB file (the reference model stays where it is)."""
    target.mkdir(parents=True)
    shutil.copyfile(DataDir.at(base[0]).database, DataDir.at(target).database)
    return DataDir.at(target)


def anchor_rows(layout: DataDir) -> list[tuple]:
    con = store.connect(layout.database, read_only=True)
    try:
        return con.execute(
            "SELECT pair_id, fingerprint, anchor, generation_json FROM anchor_responses ORDER BY ALL"
        ).fetchall()
    finally:
        con.close()


def weight_rows(layout: DataDir) -> list[tuple]:
    con = store.connect(layout.database, read_only=True)
    try:
        return con.execute(
            "SELECT * FROM token_weights ORDER BY fingerprint, pair_id, side, position"
        ).fetchall()
    finally:
        con.close()


def precompute_both(layout: DataDir, reference: ReferenceHandle, settings: PrecomputeSettings):
    open_db = database_at(layout.database)
    anchors = sample_anchors(open_db, reference, SAMPLING, precompute=settings, layout=layout, progress=False)
    weights = weigh_tokens(
        open_db, reference, anchors.fingerprint, WEIGHING, precompute=settings, layout=layout, progress=False
    )
    return anchors, weights


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory):
    layout = fresh_data_dir(base, tmp_path_factory.mktemp("one") / "data")
    anchors, weights = precompute_both(layout, base[1], in_process())
    return layout, anchors, weights


# --- the plan ---------------------------------------------------------------------------------------------


def test_ranks_take_every_shard_once_whatever_the_process_count():
    for world in (1, 2, 3, 7):
        taken = sorted(i for rank in range(world) for i in precompute.shards_for_rank(10, rank, world))
        assert taken == list(range(10))
    assert precompute.shards_for_rank(10, 1, 3) == [1, 4, 7]


def test_rank_and_world_come_from_the_launcher():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert precompute.rank_from_env(env) == (3, 4, 1, 2)
    assert precompute.rank_from_env({}) == (0, 1, 0, 1)


def test_a_shard_size_below_one_is_refused():
    with pytest.raises(UserInputError, match="batches_per_shard"):
        precompute.shard_size(4, 0)


def _toy_plan(tmp_path: Path, items: int = 5, size: int = 2) -> tuple[ShardDir, ShardPlan, pa.Table]:
    keys = [f"k{i}" for i in range(items)]
    plan = precompute.make_plan("anchors", "fp", {"setting": 1}, keys, size)
    return ShardDir(tmp_path / "plan"), plan, pa.table({"pair_id": keys})


def test_a_plan_is_reused_only_for_the_same_items_and_settings(tmp_path):
    folder, plan, items = _toy_plan(tmp_path)
    assert plan.shards == 3 and [plan.rows(i) for i in range(3)] == [2, 2, 1]
    assert precompute.prepare_folder(folder, plan, items) is False
    folder.shard(0).write_bytes(b"finished")
    folder.temporary(1, "123").write_bytes(b"half")
    assert precompute.prepare_folder(folder, plan, items) is True
    assert folder.shard(0).exists() and not folder.temporaries()  # finished kept, the half-written file gone
    other = precompute.make_plan("anchors", "fp", {"setting": 2}, [f"k{i}" for i in range(5)], 2)
    assert precompute.prepare_folder(folder, other, items) is False
    assert not folder.shard(0).exists()


def test_shard_checks_name_the_missing_truncated_or_short_file(tmp_path):
    folder, plan, items = _toy_plan(tmp_path)
    precompute.prepare_folder(folder, plan, items)
    for index in range(plan.shards):
        precompute._write_atomically(
            folder.shard(index),
            precompute._parquet_bytes(items.slice(2 * index, plan.rows(index))),
            folder.temporary(index, "t"),
        )
    assert precompute.check_shards(folder, plan) == [folder.shard(i) for i in range(3)]
    folder.shard(2).write_bytes(precompute._parquet_bytes(items.slice(0, 2)))  # 2 rows where 1 is planned
    with pytest.raises(UserInputError, match=r"shard-00002\.parquet holds 2 rows, the plan 1"):
        precompute.check_shards(folder, plan)
    data = folder.shard(1).read_bytes()
    folder.shard(1).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=r"shard-00001\.parquet is unreadable"):
        precompute.check_shards(folder, plan)
    folder.shard(0).unlink()
    with pytest.raises(UserInputError, match=r"shard-00000\.parquet is missing"):
        precompute.check_shards(folder, plan)


# --- one process and two processes ------------------------------------------------------------------------


def test_two_processes_store_exactly_the_rows_of_one_process(base, one_process, tmp_path):
    single, single_anchors, single_weights = one_process
    layout = fresh_data_dir(base, tmp_path / "two")
    anchors, weights = precompute_both(layout, base[1], two_processes())

    assert (
        anchors.fingerprint == single_anchors.fingerprint
        and weights.fingerprint == single_weights.fingerprint
    )
    assert anchors.generated == single_anchors.generated == PAIRS
    assert anchor_rows(layout) == anchor_rows(single)
    assert weight_rows(layout) == weight_rows(single)
    assert len(weight_rows(single)) > 0 and weights.computed == 3 * PAIRS
    for report, shards in ((anchors, 6), (weights, 9)):
        assert report.shards is not None
        assert (
            report.shards.processes,
            report.shards.planned,
            report.shards.computed,
            report.shards.reused,
        ) == (2, shards, shards, 0)
    for report in (single_anchors, single_weights):
        assert report.shards.processes == 1
    assert not (layout.root / "precompute").exists()  # loaded, then removed


def test_a_re_run_with_nothing_pending_launches_nothing(base, one_process):
    layout = one_process[0]
    anchors, weights = precompute_both(layout, base[1], two_processes())
    assert anchors.generated == 0 and anchors.shards is None
    assert weights.computed == 0 and weights.shards is None
    assert not (layout.root / "precompute").exists()


# --- crashes and broken shards ----------------------------------------------------------------------------


def test_a_rank_killed_mid_shard_leaves_finished_shards_for_the_re_run(base, one_process, tmp_path):
    single = one_process[0]
    layout = fresh_data_dir(base, tmp_path / "killed")
    open_db = database_at(layout.database)
    reference = base[1]
    with (
        planted(kill_after_shards=1, kill_rank=1),
        pytest.raises(PrecomputeFailed, match="re-run to compute the rest"),
    ):
        sample_anchors(
            open_db, reference, SAMPLING, precompute=two_processes(), layout=layout, progress=False
        )
    assert anchor_rows(layout) == []  # nothing loaded
    (folder,) = (layout.root / "precompute" / "anchors").iterdir()
    shards = ShardDir(folder)
    finished = sorted(p.name for p in folder.glob("shard-*.parquet"))
    assert "shard-00001.parquet" in finished  # rank 1's first shard, written before the kill
    assert "shard-00003.parquet" not in finished  # rank 1's second: killed while writing it
    # The half-written file of the killed rank is there (rank 0, stopped by torchrun, may have left one too).
    assert any(".shard-00003.parquet." in p.name for p in shards.temporaries())

    report = sample_anchors(
        open_db, reference, SAMPLING, precompute=in_process(), layout=layout, progress=False
    )
    assert report.shards is not None
    # Shards written by the killed launch were loaded as they were (their files name that launch), not sampled again.
    assert report.shards.reused == len(finished) and report.shards.computed == 6 - len(finished)
    assert anchor_rows(layout) == anchor_rows(single)
    assert not (layout.root / "precompute").exists()


def test_a_corrupt_or_missing_weight_shard_fails_naming_it_and_loads_nothing(
    base, one_process, tmp_path, monkeypatch
):
    single, single_anchors, _ = one_process
    layout = fresh_data_dir(base, tmp_path / "corrupt")
    open_db = database_at(layout.database)
    reference = base[1]
    anchors = sample_anchors(
        open_db, reference, SAMPLING, precompute=in_process(), layout=layout, progress=False
    )
    one_child = PrecomputeSettings(launcher="python", **ONE_BATCH_PER_SHARD)
    with planted(kill_after_shards=3), pytest.raises(PrecomputeFailed):
        weigh_tokens(
            open_db,
            reference,
            anchors.fingerprint,
            WEIGHING,
            precompute=one_child,
            layout=layout,
            progress=False,
        )
    (folder,) = (layout.root / "precompute" / "weights").iterdir()
    truncated = ShardDir(folder).shard(1)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UserInputError, match=rf"shard file {re.escape(str(truncated))} is unreadable"):
        weigh_tokens(
            open_db,
            reference,
            anchors.fingerprint,
            WEIGHING,
            precompute=in_process(),
            layout=layout,
            progress=False,
        )
    assert weight_rows(layout) == []

    # A rank that exits 0 without writing one of its shards (a bug): the check names the file.
    truncated.unlink()
    skip_first = precompute.shards_for_rank
    monkeypatch.setattr(
        precompute,
        "shards_for_rank",
        lambda shards, rank, world: [i for i in skip_first(shards, rank, world) if i != 1],
    )
    with pytest.raises(UserInputError, match=rf"shard file {re.escape(str(truncated))} is missing"):
        weigh_tokens(
            open_db,
            reference,
            anchors.fingerprint,
            WEIGHING,
            precompute=in_process(),
            layout=layout,
            progress=False,
        )
    assert weight_rows(layout) == []

    monkeypatch.undo()
    report = weigh_tokens(
        open_db,
        reference,
        anchors.fingerprint,
        WEIGHING,
        precompute=in_process(),
        layout=layout,
        progress=False,
    )
    assert report.shards is not None and report.shards.reused == 8 and report.shards.computed == 1
    assert anchors.fingerprint == single_anchors.fingerprint
    assert weight_rows(layout) == weight_rows(single)


# --- through the assets -------------------------------------------------------------------------------------


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_the_assets_launch_their_ranks_through_pipes_and_record_the_shards(tmp_path):
    import dagster as dg
    from pipeline_config import small_run_config

    from tidpo_pipeline.definitions import ASSETS
    from tidpo_pipeline.resources import build_resources

    selection = ["preference_pairs", "reference_model", "anchor_responses", "token_weights"]
    config = small_run_config(pairs=24)
    ops = {name: config["ops"][name] for name in selection}
    ops["anchor_responses"]["config"].update(
        {"launcher": "accelerate", "num_processes": 2, "batch_size": 4, "batches_per_shard": 1}
    )
    ops["token_weights"]["config"].update({"launcher": "python"})
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        ASSETS,
        resources=build_resources(str(tmp_path)),
        run_config={"ops": ops},
        selection=selection,
        instance=instance,
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    anchors = result.asset_materializations_for_node("anchor_responses")[0].metadata
    weights = result.asset_materializations_for_node("token_weights")[0].metadata
    train = result.output_for_node("preference_pairs")["train"]
    assert anchors["processes"].value == 2 and anchors["launcher"].value == "accelerate"
    assert anchors["shards_planned"].value == anchors["shards_computed"].value == -(-train // 4)
    assert (
        anchors["shards_reused"].value == 0
        and anchors["rows_loaded"].value == anchors["dagster/row_count"].value == train
    )
    assert (
        weights["processes"].value == 1
        and weights["shards_planned"].value == weights["shards_computed"].value == 1
    )
    assert weights["rows_loaded"].value == weights["responses"].value == 3 * train
    # Rank 0 reported its progress to Dagster through Pipes.
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("anchors: shard" in m and "shards finished" in m for m in messages)
    assert not (tmp_path / "precompute").exists()
