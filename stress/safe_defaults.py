"""Scenario: safe defaults. The web UI binds localhost, remote code and generated-code execution are off
unless asked for, pickle files are never read, and models are stored as safetensors."""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from pathlib import Path
from typing import Any

from stress.config import ROOT
from stress.verdict import Verdict

# Reported as figures, not held to be true.
_FIGURES = ("model_weight_files_safetensors", "pickled_files_in_model_folders")


def _pickles_refused() -> bool:
    """A pickle-looking file is neither loaded as preferences nor picked up from the inbox."""
    from tidpo_core.data.files import is_data_file, load_preferences
    from tidpo_core.data.pairs import DataFileError

    with tempfile.TemporaryDirectory() as tmp:
        refused = 0
        for name in ("rows.pkl", "rows.pt", "rows.bin", "rows.pickle"):
            path = Path(tmp) / name
            path.write_bytes(b"\x80\x04N.")  # pickle of None: must never be unpickled
            with contextlib.suppress(DataFileError):
                load_preferences(path)
                continue
            refused += not is_data_file(path)
        return refused == 4


def _model_files(data_dir: Path) -> dict[str, Any]:
    """How many model weight files in a trained data dir are safetensors, and which are pickled."""
    models = [p for p in (data_dir / "models").rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    artifacts = (
        [p for p in (data_dir / "mlartifacts").rglob("*") if p.is_file()]
        if (data_dir / "mlartifacts").exists()
        else []
    )
    pickled = [
        str(p.relative_to(data_dir))
        for p in models + artifacts
        if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
    ]
    return {
        "model_weight_files_safetensors": sum(p.suffix == ".safetensors" for p in models + artifacts),
        "pickled_files_in_model_folders": pickled,
    }


def scenario_safe_defaults(data_dir: Path | None) -> Verdict:
    """The defaults, and the model files of `data_dir` when a trained one is given."""
    print("\n== safe defaults")
    from tidpo_core.evaluation import benchmarks
    from tidpo_core.models import modeling
    from tidpo_pipeline.assets.evaluate import EvaluationConfig
    from tidpo_pipeline.assets.reference import ReferenceModelConfig

    makefile = (ROOT / "Makefile").read_text()
    ui = next((line for line in makefile.splitlines() if "dagster dev" in line), "")
    out: dict[str, Any] = {
        "webserver_binds_localhost": "-h 127.0.0.1" in ui and "0.0.0.0" not in makefile,
        "trust_remote_code_default_off": ReferenceModelConfig().trust_remote_code is False
        and inspect.signature(modeling.load_model_and_tokenizer).parameters["trust_remote_code"].default
        is False,
        "code_execution_default_off": benchmarks.BenchmarkOptions().allow_code_execution is False
        and EvaluationConfig().allow_code_execution is False,
    }
    out["pickle_files_refused_and_not_picked_up_from_inbox"] = _pickles_refused()
    if data_dir is not None:
        out.update(_model_files(data_dir))
    print(f"   {out}")
    passed = all(v for k, v in out.items() if k not in _FIGURES) and not out.get(
        "pickled_files_in_model_folders"
    )
    return Verdict("safe_defaults", passed, out)
