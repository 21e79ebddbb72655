"""Sample the anchors: one response per train prompt from the reference (the triplet loss's anchor).

The pairs without an anchor are sampled as a sharded precompute (tidpo_core.runtime.precompute): in this process
or in N processes through the training launcher, each anchor drawn with its own seed (from its pair id
and the sampling settings), so an anchor is the same whatever the process count or its batch-mates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from tidpo_core import store
from tidpo_core.models.generation import SamplingSettings, sample_responses
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.launch import ProcessRunner
from tidpo_core.runtime.layout import DataDir
from tidpo_core.runtime.precompute import (
    PrecomputeSettings,
    ShardOutcome,
    ShardWorker,
    data_dir_of,
    make_plan,
    remove_folder,
    run_sharded,
    shard_size,
)
from tidpo_core.steps import OpenDb, log_to
from tidpo_core.steps.reference import ReferenceHandle

SHARD_KIND = "anchors"
# Anchors drawn per pair (generation's row seeds) are other draws than the batch-seeded ones stored
# before 2026-12: another fingerprint, so a table never mixes the two.
SEEDING = "per_pair"


@dataclass(frozen=True)
class AnchorBackend:
    generation_backend: Literal["transformers", "vllm"] = "transformers"
    """`transformers`: the model's generate() on any device, CPU included. `vllm`: vLLM's engine, the fast way
    to sample on CUDA GPUs (`pip install 'tidpo[vllm]'`; refused without CUDA), one engine per process. Both
    seed each anchor from its pair id; their random streams differ, so vLLM anchors have their own
    fingerprint."""
    vllm_gpu_memory_utilization: float = 0.85
    """With vllm: the share of each GPU's memory vLLM may take (weights and KV cache)."""


@dataclass(frozen=True)
class AnchorsReport:
    fingerprint: str
    generated: int
    stored: int
    preview: list[tuple[str, str, str]]
    shards: ShardOutcome | None = None
    """How the sampling was sharded (None: nothing to sample)."""


def anchors_fingerprint(
    reference: ReferenceHandle, settings: SamplingSettings, backend: AnchorBackend = AnchorBackend()
) -> str:
    # The backend only when it is not the default, so that transformers anchors keep their fingerprint.
    extra = {} if backend.generation_backend == "transformers" else {"backend": backend.generation_backend}
    return digest(
        {"model": reference.fingerprint, "sampling": settings.as_dict(), "seeding": SEEDING, **extra}
    )


def pair_seed(pair_id: str, settings: SamplingSettings) -> int:
    """The seed of a pair's anchor: its pair id and the sampling settings. Not the batch size, which
    only decides how many rows run together and does not change a row's draw."""
    sampling = {name: value for name, value in settings.as_dict().items() if name != "batch_size"}
    return int(digest({"pair_id": pair_id, "sampling": sampling}, 15), 16)


def shard_worker(task: Mapping[str, Any]) -> ShardWorker:
    """The anchors' computation in a precompute process: the sampler (the reference, or a vLLM engine over it)
    loaded once, then per shard its prompts sampled with each pair's seed."""
    settings = SamplingSettings(**task["sampling"])
    backend = AnchorBackend(**task.get("backend", {}))
    draw: Callable[[list[str], list[int], bool], list[str]]
    if backend.generation_backend == "vllm":
        from tidpo_core.models.vllm import VllmSampler

        reference = task["reference"]
        draw = VllmSampler(
            reference["name_or_path"],
            settings,
            revision=reference["revision"],
            trust_remote_code=reference["trust_remote_code"],
            gpu_memory_utilization=backend.vllm_gpu_memory_utilization,
        )
        models: tuple[Any, ...] = ()
    else:
        model, tokenizer = load_model_and_tokenizer(**task["reference"])

        def draw(prompts: list[str], seeds: list[int], progress: bool) -> list[str]:
            return sample_responses(model, tokenizer, prompts, settings, progress, seeds)

        models = (model,)

    def sample(items: pa.Table, progress: bool) -> pa.Table:
        pair_ids = items.column("pair_id").to_pylist()
        seeds = [pair_seed(pair_id, settings) for pair_id in pair_ids]
        return store.anchor_shard_table(pair_ids, draw(items.column("prompt").to_pylist(), seeds, progress))

    return ShardWorker(sample, models)


def sample_anchors(
    open_db: OpenDb,
    reference: ReferenceHandle,
    settings: SamplingSettings,
    *,
    backend: AnchorBackend = AnchorBackend(),
    precompute: PrecomputeSettings = PrecomputeSettings(),
    layout: DataDir | None = None,
    run_process: ProcessRunner | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> AnchorsReport:
    """Anchors for the train pairs that have none under these settings yet (a re-run samples only those).

    `precompute` says how (in this process, or N processes); `layout` is the data dir that holds the
    shards in flight (default: the DuckDB file's folder); `run_process` runs a launched command (Dagster
    Pipes in the asset; a plain subprocess by default).
    """
    say = log_to(log)
    if backend.generation_backend == "vllm":
        from tidpo_core.models.vllm import check_vllm_usable

        check_vllm_usable()  # here, before any process starts: the user error, not a rank's traceback
    fingerprint = anchors_fingerprint(reference, settings, backend)
    with open_db() as con:
        missing = store.missing_anchor_pair_ids(con, fingerprint)  # sorted by pair id: the plan's order
        prompts = {p.pair_id: p.prompt for p in store.read_pairs(con, split="train")}
        layout = layout or DataDir.at(data_dir_of(con))
    say(f"{len(missing)} anchors to sample, {len(prompts) - len(missing)} reused")
    outcome, generated = None, 0
    if missing:
        task = {
            "reference": reference.loading(),
            "sampling": settings.as_dict(),
            "backend": dataclasses.asdict(backend),
        }
        plan = make_plan(
            SHARD_KIND,
            fingerprint,
            task,
            missing,
            shard_size(settings.batch_size, precompute.batches_per_shard),
        )
        items = pa.table({"pair_id": missing, "prompt": [prompts[pair_id] for pair_id in missing]})
        outcome = run_sharded(
            layout.precompute(SHARD_KIND, fingerprint),
            plan,
            items,
            precompute,
            run_process=run_process,
            progress=progress,
            log=say,
        )
        with open_db() as con:
            generated = store.load_anchor_shards(con, fingerprint, outcome.files, settings.as_dict())
        remove_folder(outcome.folder)
        say(
            f"{generated} anchors loaded from {outcome.planned} shards ({outcome.reused} reused from an interrupted run)"
        )
    else:
        # A run killed after its load committed but before the folder went: the shards are in DuckDB.
        remove_folder(layout.precompute(SHARD_KIND, fingerprint))
    with open_db() as con:
        return AnchorsReport(
            fingerprint,
            generated,
            store.anchor_count(con, fingerprint),
            store.first_anchors(con, fingerprint, 5),
            outcome,
        )
