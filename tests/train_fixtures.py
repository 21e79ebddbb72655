"""A tiny training data set built directly with tidpo_core (no Dagster): what the assets preference_pairs,
reference_model, anchor_responses and token_weights write, in a couple of seconds.

Shared by tests/test_train.py and tests/test_train_distributed.py; every train pair lands in the train
split so that the batch count is exact (40 pairs / batch 4 = 10 batches).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tidpo_core import store
from tidpo_core.batching.features import EncodingSettings, encode_response, side_texts, token_weights_row
from tidpo_core.data.pairs import LoadResult
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.method.importance import compute_token_importance
from tidpo_core.models.generation import SamplingSettings, sample_responses
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    save_model_and_tokenizer,
    torch_threads,
    train_tokenizer,
)
from tidpo_core.runtime.fingerprint import text_digest
from tidpo_core.runtime.offline import offline_child_environment
from tidpo_core.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENCODING = EncodingSettings(max_prompt_tokens=64, max_response_tokens=128)
TINY = TinyModelConfig(
    vocab_size=400,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
)


@dataclass(frozen=True)
class TinyData:
    root: Path
    duckdb_path: Path
    reference_path: Path
    weights_fingerprint: str
    anchors_fingerprint: str
    train_pairs: int

    def config(self, output_dir: Path | str, **overrides: Any) -> TrainConfig:
        values: dict[str, Any] = {
            "duckdb_path": str(self.duckdb_path),
            "reference_model_path": str(self.reference_path),
            "output_dir": str(output_dir),
            "weights_fingerprint": self.weights_fingerprint,
            "anchors_fingerprint": self.anchors_fingerprint,
            "max_prompt_tokens": ENCODING.max_prompt_tokens,
            "max_response_tokens": ENCODING.max_response_tokens,
            "per_device_batch_size": 4,
            "learning_rate": 3e-3,
            "warmup_steps": 1,
            "checkpoint_every": 0,
            "progress": False,
            "mixed_precision": "no",
            "seed": 0,
        }
        values.update(overrides)
        return TrainConfig(**values)


def build_tiny_data(root: Path, pairs: int = 40, seed: int = 0, reference_topk: int = 0) -> TinyData:
    root.mkdir(parents=True, exist_ok=True)
    duckdb_path = root / store.DATABASE_FILE
    data = generate_synthetic_pairs(pairs, seed=seed)
    con = store.connect(duckdb_path)
    try:
        store.replace_pairs(con, LoadResult(list(data), [], len(data)), eval_fraction=0.0)
        train = store.read_pairs(con, split="train")
        tokenizer = train_tokenizer(
            [t for p in train for t in (p.prompt, p.chosen, p.rejected)], vocab_size=TINY.vocab_size
        )
        model = build_tiny_model(tokenizer, TINY, seed=seed)
        reference_path = save_model_and_tokenizer(model, tokenizer, root / "reference")
        sampling = SamplingSettings(
            max_new_tokens=8, batch_size=64, max_prompt_tokens=ENCODING.max_prompt_tokens
        )
        generated = sample_responses(model, tokenizer, [p.prompt for p in train], sampling)
        anchors = {p.pair_id: (t if t.strip() else "ok") for p, t in zip(train, generated, strict=True)}
        store.insert_anchors(con, "tiny-anchors", anchors, sampling.as_dict())
        todo = [
            (pair.pair_id, side, text, encode_response(tokenizer, pair.prompt, text, ENCODING))
            for pair in train
            for side, text in side_texts(pair, anchors[pair.pair_id]).items()
        ]
        importances = compute_token_importance(
            model, [t[3] for t in todo], batch_size=64, reference_topk=reference_topk
        )
        rows = [
            token_weights_row(pair_id, side, text_digest(text), enc, imp)
            for (pair_id, side, text, enc), imp in zip(todo, importances, strict=True)
        ]
        store.write_token_weights(con, "tiny-weights", rows)
    finally:
        con.close()
    return TinyData(root, duckdb_path, reference_path, "tiny-weights", "tiny-anchors", len(train))


def subprocess_env() -> dict[str, str]:
    env = offline_child_environment(os.environ)
    env.update(
        {
            # One thread per process: the tiny model gains nothing from more, and on a busy 2-core machine
            # OpenMP threads spinning against each other make a step 10-50x slower.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        }
    )
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    env.pop("DAGSTER_PIPES_MESSAGES", None)
    return env


def run_engine(
    config_path: Path, *, launcher: list[str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """`python -m tidpo_core.training --config F` (or the given launcher prefix) in a fresh process."""
    command = [*(launcher or [sys.executable]), "-m", "tidpo_core.training", "--config", str(config_path)]
    return subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def single_thread() -> AbstractContextManager[None]:
    """In-process runs on one intra-op thread, like the subprocesses (see subprocess_env)."""
    return torch_threads(1)


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def load_weights(folder: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
