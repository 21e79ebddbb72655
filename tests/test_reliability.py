"""Reliability and safety: the data dir's run lock, a trainer that dies with its step, dependencies that
are down, registry safety under gate failures and NaN runs, a SIGKILL in the middle of anchor
generation, and safe defaults. `make stress` runs the longer versions (stress/run.py)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from pipeline_config import small_run_config

from tidpo_core import store
from tidpo_core.data.files import is_data_file, load_preferences
from tidpo_core.data.pairs import DataFileError
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    load_model_and_tokenizer,
    save_model_and_tokenizer,
    train_tokenizer,
)
from tidpo_core.runtime import tracking
from tidpo_core.runtime.faults import Faults
from tidpo_core.runtime.launch import bind_to_parent
from tidpo_core.runtime.lock import DataDirBusyError, DataDirLock
from tidpo_pipeline.checks import ALL_CHECKS
from tidpo_pipeline.definitions import ASSETS
from tidpo_pipeline.resources import (
    MlflowTracking,
    QualityRules,
    TidpoDuckDB,
    build_resources,
)

REPO = Path(__file__).resolve().parent.parent
BUSY = "is in use by another tidpo run"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


def _materialize(data_dir, run_config, selection=None, instance=None, **overrides):
    resources = {**build_resources(str(data_dir)), **overrides}
    return dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=resources,
        run_config=run_config,
        instance=instance,
        selection=selection,
        raise_on_error=False,
    )


def _errors(result) -> str:
    """Every error message of a Dagster result, causes included."""
    messages = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            messages.append(f"{error.cls_name}: {error.message}")
            error = error.cause or error.context
    return "\n".join(messages)


def _pairs_config(pairs: int = 40) -> dict:
    return {"ops": {"preference_pairs": {"config": {"synthetic_pairs": pairs, "eval_fraction": 0.25}}}}


def _counts(data_dir: Path) -> dict[str, int]:
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        return {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in (
                "preference_pairs",
                "quarantine",
                "anchor_responses",
                "token_weights",
                "evaluation_metrics",
            )
        }
    finally:
        con.close()


def _hold_lock(data_dir: Path) -> subprocess.Popen:
    """Another process holding the data dir's lock until its stdin closes (or it is killed)."""
    code = (
        "import sys; from tidpo_core.runtime.lock import DataDirLock; "
        "lock = DataDirLock(sys.argv[1], {'run_id': 'other-run', 'job': 'tidpo_training'}).acquire(); "
        "print('held', flush=True); sys.stdin.read(); lock.release()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


# --- the run lock ---------------------------------------------------------------------------------------


def test_lock_is_exclusive_across_processes_names_the_holder_and_dies_with_it(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(DataDirBusyError, match=f"Dagster run other-run .*PID {holder.pid} "):
            DataDirLock(tmp_path).acquire()
        started = time.monotonic()
        with pytest.raises(DataDirBusyError, match="after waiting 0.5 s"):
            DataDirLock(tmp_path, timeout_s=0.5).acquire()
        assert time.monotonic() - started > 0.4  # it did wait; an upper bound would time the machine
    finally:
        holder.kill()  # SIGKILL: the kernel releases the flock, no stale lock is left behind
        holder.wait()
    with DataDirLock(tmp_path, {"run_id": "mine"}) as lock:
        assert lock.holder_info()["pid"] == os.getpid() and lock.holder_info()["run_id"] == "mine"
        with DataDirLock(tmp_path, {"run_id": "mine"}):  # re-entrant for the same run
            pass
        assert lock.holder_info()["pid"] == os.getpid()
        with pytest.raises(DataDirBusyError, match="Dagster run mine"):
            DataDirLock(tmp_path, {"run_id": "another"}).acquire()
    assert DataDirLock(tmp_path).holder_info() == {}


STEPS_SCRIPT = """
import multiprocessing, sys, time
from tidpo_core.runtime.lock import DataDirLock

def step(data_dir, name):
    with DataDirLock(data_dir, {"run_id": "run-a"}):
        print(name, flush=True)
        time.sleep(0.3)

if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")  # what Dagster's multiprocess executor uses
    steps = [spawn.Process(target=step, args=(sys.argv[1], name)) for name in ("step-1", "step-2")]
    for p in steps:
        p.start()
    for p in steps:
        p.join()
    print("between steps", flush=True)
    sys.stdin.read()
"""


def test_steps_of_one_run_share_the_lock_and_the_run_holds_it_between_steps(tmp_path):
    """The multiprocess executor: step processes of one run run side by side; another run is refused
    while the run's process lives, even when no step is running at that moment."""
    script = tmp_path / "run_a.py"
    script.write_text(STEPS_SCRIPT)
    run = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        lines = [run.stdout.readline().strip() for _ in range(3)]
        assert sorted(lines[:2]) == ["step-1", "step-2"] and lines[2] == "between steps"
        with pytest.raises(DataDirBusyError, match=f"Dagster run run-a.*run process PID {run.pid}"):
            DataDirLock(tmp_path / "data", {"run_id": "run-b"}).acquire()
        with DataDirLock(tmp_path / "data", {"run_id": "run-a"}):  # a later step of the same run
            pass
    finally:
        run.stdin.close()
        run.wait()
    with DataDirLock(tmp_path / "data", {"run_id": "run-b"}):  # run-a is over: its stale file goes
        assert [h["run_id"] for h in DataDirLock(tmp_path / "data").holders()] == ["run-b"]


def test_a_run_on_a_busy_data_dir_fails_fast_and_changes_nothing(tmp_path):
    assert _materialize(tmp_path, _pairs_config(40), selection=["preference_pairs"]).success
    assert DataDirLock(tmp_path).holder_info() == {}  # released at the end of the run
    before = _counts(tmp_path)
    holder = _hold_lock(tmp_path)
    try:
        result = _materialize(tmp_path, _pairs_config(80), selection=["preference_pairs"])
    finally:
        holder.kill()
        holder.wait()
    assert not result.success
    errors = _errors(result)
    assert BUSY in errors and f"PID {holder.pid}" in errors and str(tmp_path) in errors
    assert "after waiting" not in errors  # the default does not wait: the holder never lets go here
    assert _counts(tmp_path) == before
    assert _materialize(tmp_path, _pairs_config(80), selection=["preference_pairs"]).success  # lock freed


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_with_a_lock_timeout_runs_serialize(tmp_path):
    holder = _hold_lock(tmp_path)
    threading.Timer(2.0, holder.stdin.close).start()  # the other run finishes after 2 s
    waiting = TidpoDuckDB(database=str(tmp_path / store.DATABASE_FILE), lock_timeout_s=60)
    started = time.monotonic()
    result = _materialize(tmp_path, _pairs_config(), selection=["preference_pairs"], duckdb=waiting)
    holder.wait()
    assert result.success
    assert time.monotonic() - started > 1.5


def test_a_reader_holding_the_duckdb_file_delays_a_run_instead_of_failing_it(tmp_path):
    assert _materialize(tmp_path, _pairs_config(), selection=["preference_pairs"]).success
    code = (
        "import sys, time, duckdb; c = duckdb.connect(sys.argv[1], read_only=True); "
        "print('open', flush=True); time.sleep(2)"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / store.DATABASE_FILE)], stdout=subprocess.PIPE, text=True
    )
    assert reader.stdout.readline().strip() == "open"
    result = _materialize(tmp_path, _pairs_config(60), selection=["preference_pairs"])
    reader.wait()
    assert result.success
    assert _counts(tmp_path)["preference_pairs"] == 60


def test_the_trainer_s_read_only_open_waits_for_a_writer_to_let_go(tmp_path):
    """The training process opens DuckDB read-only; a parallel step writing a chunk must delay it, not
    crash it (DuckDB refuses a reader while another process writes)."""
    path = tmp_path / store.DATABASE_FILE
    store.connect(path).close()
    code = "import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); print('open', flush=True); time.sleep(1.5)"
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "open"
    started = time.monotonic()
    con = store.connect(path, read_only=True)
    con.close()
    writer.wait()
    assert time.monotonic() - started > 0.5


def test_a_failing_body_closes_its_duckdb_connection(tmp_path):
    resource = TidpoDuckDB(database=str(tmp_path / store.DATABASE_FILE))
    with pytest.raises(RuntimeError, match="boom"), resource.get_connection() as con:
        raise RuntimeError("boom")
    with pytest.raises(Exception, match="(?i)closed"):
        con.execute("SELECT 1")


def test_the_trainer_dies_with_the_step_that_launched_it(tmp_path):
    code = (
        "import subprocess, sys; from tidpo_core.runtime.launch import bind_to_parent; "
        "p = subprocess.Popen(bind_to_parent(['/bin/sleep', '60'])); print(p.pid, flush=True); p.wait()"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while (
        not Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"/bin/sleep")
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"/bin/sleep")  # the wrapper exec'd it
    parent.kill()
    parent.wait()

    def alive() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()
    assert bind_to_parent(["x"])[-1] == "x"


# --- dependencies down ----------------------------------------------------------------------------------


def test_an_unreachable_tracking_server_fails_without_retries(monkeypatch):
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP")}
    with pytest.raises(tracking.TrackingUnavailableError, match="127.0.0.1:9.*not reachable"):
        MlflowTracking(tracking_uri=UNREACHABLE).experiment_id()
    # "Within seconds" means: the probe runs with MLflow's retries cut (its own would take about four
    # minutes). Checked on the settings the probe runs under, not on a clock.
    seen = {}

    class Probe:
        def search_experiments(self, **_):
            seen.update(
                {
                    k: os.environ.get(k)
                    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
                }
            )
            raise ConnectionError("refused")

    monkeypatch.setattr(tracking, "client", lambda uri: Probe())
    with pytest.raises(tracking.TrackingUnavailableError):
        tracking.check_tracking(UNREACHABLE)
    assert seen == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(tracking.CHECK_HTTP_RETRIES),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(tracking.CHECK_HTTP_TIMEOUT_S),
    }
    # The probe's no-retry setting is not left behind for the calls of a long run.
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP")} == env_before


def test_reference_model_fails_before_any_work_when_tracking_is_down(tmp_path):
    config = {
        **_pairs_config(),
        "ops": {**_pairs_config()["ops"], "reference_model": {"config": {"sft_steps": 5}}},
    }
    down = MlflowTracking(data_dir=str(tmp_path), tracking_uri=UNREACHABLE)
    result = _materialize(
        tmp_path, config, selection=["preference_pairs", "reference_model"], mlflow_tracking=down
    )
    assert not result.success
    assert "not reachable" in _errors(result)
    assert not (tmp_path / "models").exists()  # "before any work": no tokenizer, no SFT, nothing saved


@pytest.mark.parametrize("name", ["missing_dir", "no-such-org/no-such-model"])
def test_a_missing_model_fails_before_any_work(tmp_path, name):
    model = str(tmp_path / name) if name == "missing_dir" else name
    config = {"ops": {**_pairs_config()["ops"], "reference_model": {"config": {"model_name_or_path": model}}}}
    result = _materialize(tmp_path, config, selection=["preference_pairs", "reference_model"])
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data
    # A user error: a dagster.Failure with the message and the path, and no chained traceback.
    assert (
        failure.error.cls_name == "Failure" and model in failure.error.message and failure.error.cause is None
    )
    assert failure.user_failure_data.metadata["model"].value == model
    uri = tracking.sqlite_tracking_uri(tmp_path)
    experiment = tracking.client(uri).get_experiment_by_name(tracking.EXPERIMENT)
    runs = tracking.client(uri).search_runs([experiment.experiment_id]) if experiment else []
    assert not runs  # no MLflow run recorded for a model that was never loaded
    assert not (tmp_path / "models").exists()


# --- registry safety, and a crash mid-anchor-generation ------------------------------------------------


def _registry_config(**policy) -> dict:
    config = small_run_config(pairs=64, steps=6, **policy)
    # Anchors in shards of 32 pairs (8 batches of 4): two shards for the crash test below.
    config["ops"]["anchor_responses"]["config"]["batch_size"] = 4
    config["ops"]["evaluation"] = {"config": {"heatmap_pairs": 0, "sample_prompts": 8, "max_new_tokens": 16}}
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("registry")
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(data_dir, _registry_config(), instance=instance)
    assert result.success, _errors(result)
    return data_dir, instance


def _versions(data_dir: Path) -> list:
    client = tracking.client(tracking.sqlite_tracking_uri(data_dir))
    return sorted(
        client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}'"), key=lambda v: int(v.version)
    )


def evaluation_pair_count(result) -> int:
    return int(result.output_for_node("evaluation")["metrics"]["policy"]["eval_pairs"])


def _champion(data_dir: Path) -> str | None:
    info = tracking.champion(tracking.sqlite_tracking_uri(data_dir))
    return info.version if info else None


class NanInjectingPipesClient(dg.PipesSubprocessClient):
    """Plants a NaN loss at `step` (a fault of the training engine, see tidpo_core.runtime.faults) in the run's environment."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def run(self, *, env=None, **kwargs):  # type: ignore[override]
        return super().run(env={**(env or {}), **Faults(nan_at_step=self.step).as_env()}, **kwargs)


def test_a_model_failing_the_gate_is_registered_but_never_champion(trained):
    data_dir, instance = trained
    before_versions, before_champion = _versions(data_dir), _champion(data_dir)
    result = _materialize(
        data_dir, _registry_config(seed=1), instance=instance, quality=QualityRules(gate_margin=10.0)
    )
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["evaluation_gate"] is False
    versions = _versions(data_dir)
    assert len(versions) == len(before_versions) + 1
    assert versions[-1].tags.get("gate") == "failed"
    assert _champion(data_dir) == before_champion
    evaluation = result.asset_materializations_for_node("evaluation")[0].metadata
    assert evaluation["champion"].value is False
    from tidpo_pipeline.run import gate_verdict

    assert gate_verdict(result).startswith(
        f"gate failed: champion unchanged, version {versions[-1].version} tagged gate=failed ("
    )
    # The challenger was judged against the reference and the current champion, on the same pairs.
    assert evaluation["compared_with"].value == f"reference, champion v{before_champion}"
    assert "key_metrics_vs_champion" in evaluation
    # Same data as the champion's run: every eval pair is shared, none is new.
    assert evaluation["eval_pairs_new_since_champion"].value == 0
    assert evaluation["eval_pairs_shared_with_champion"].value == evaluation_pair_count(result) > 0
    assert versions[-1].tags["compared_with"] == f"reference, champion v{before_champion}"
    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        history = store.champion_history(con, "tidpo-policy")
        champion_rows = con.execute(
            "SELECT count(*) FROM evaluation_metrics WHERE model = 'champion'"
        ).fetchone()[0]
    finally:
        con.close()
    assert [(e.version, e.event) for e in history][-1] == (str(versions[-1].version), "refused")
    assert history[-1].previous_champion == str(before_champion) and champion_rows > 0


def test_a_retraining_can_start_from_the_champion_and_still_compares_with_the_reference(trained):
    data_dir, instance = trained
    champion = _champion(data_dir)
    result = _materialize(data_dir, _registry_config(seed=3, init_from="champion"), instance=instance)
    assert result.success, _errors(result)
    run_dir = Path(result.output_for_node("tidpo_policy")["run_dir"])
    train_yaml = yaml.safe_load((run_dir / "train.yaml").read_text())
    # The policy starts from the champion's weights; the reference (log-ratios, KL) stays the original.
    assert train_yaml["init_model_path"] == str(run_dir / f"init_champion_v{champion}")
    assert train_yaml["reference_model_path"] != train_yaml["init_model_path"]
    starting, _ = load_model_and_tokenizer(train_yaml["init_model_path"])
    registered, _ = tracking.load_registered_model(
        tracking.sqlite_tracking_uri(data_dir), f"models:/tidpo-policy/{champion}"
    )
    for a, b in zip(starting.state_dict().values(), registered.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_nan_run_registers_nothing_and_keeps_the_champion(trained):
    data_dir, instance = trained
    before_versions, before_champion = _versions(data_dir), _champion(data_dir)
    result = _materialize(
        data_dir,
        _registry_config(seed=2),
        instance=instance,
        pipes_subprocess_client=NanInjectingPipesClient(2),
    )
    assert not result.success
    failures = result.get_step_failure_events()
    assert [e.step_key for e in failures] == ["tidpo_policy"]
    # The step's error says why, not only that the training process exited with status 1.
    message = failures[0].event_specific_data.error.message
    assert "training failed: NonFiniteLossError: non-finite loss at optimizer step 2" in message, message
    assert "evaluation" not in {e.step_key for e in result.get_step_success_events()}
    assert len(_versions(data_dir)) == len(before_versions)
    assert _champion(data_dir) == before_champion
    client = tracking.client(tracking.sqlite_tracking_uri(data_dir))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    statuses = [
        r.info.status
        for r in client.search_runs([experiment.experiment_id], "attributes.run_name LIKE 'tidpo_policy%'")
    ]
    assert "FAILED" in statuses


def test_registering_a_run_again_reuses_its_version(trained):
    """A run killed between registration and being marked finished is resumed in the same MLflow run;
    registering it again must not add a second version."""
    data_dir, _ = trained
    uri = tracking.sqlite_tracking_uri(data_dir)
    before = _versions(data_dir)
    first = before[0]
    info = tracking.log_transformers_model(uri, first.run_id, "/nonexistent: never loaded")
    assert info.registered_model_version == int(first.version)
    assert len(_versions(data_dir)) == len(before)


def test_models_are_stored_as_safetensors_only(trained):
    data_dir, _ = trained
    files = [p for p in data_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    model_files = [p for p in files if "models" in p.parts or "mlartifacts" in p.parts]
    assert any(p.suffix == ".safetensors" for p in model_files)
    assert not [p for p in model_files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]


def test_a_run_killed_inside_the_anchor_load_resumes_from_its_shards_to_the_uninterrupted_result(
    trained, tmp_path
):
    """SIGKILL of the run's process (in-process executor: the step process) while the anchors' shards are
    being loaded (one DuckDB transaction for all of them): no anchor row is stored, the finished shard
    files stay, and the re-run loads them without sampling again, ending with exactly the anchors of an
    uninterrupted run."""
    uninterrupted_dir, _ = trained
    config = _registry_config()
    selection = "preference_pairs,reference_model,anchor_responses"
    crash_dir = tmp_path / "crash"
    # Same pairs and config, so the same reference model: reuse it rather than train it again.
    shutil.copytree(uninterrupted_dir / "models" / "reference", crash_dir / "models" / "reference")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stress.run",
            "worker",
            "--data-dir",
            str(crash_dir),
            "--config",
            json.dumps(config),
            "--select",
            selection,
            "--pause-in",
            "anchors",
            "--pause-in-s",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    reached = False
    for line in worker.stdout:
        if "in-transaction anchors" in line:
            reached = True
            worker.kill()
            break
    worker.wait()
    assert reached, "the worker never reached the anchors' load transaction"
    assert _counts(crash_dir)["anchor_responses"] == 0  # the load is all or nothing
    shards = sorted((crash_dir / "precompute" / "anchors").glob("*/shard-*.parquet"))
    assert len(shards) >= 2  # about 48 train pairs, in shards of 8 batches of 4

    partial = {"ops": {k: v for k, v in config["ops"].items() if k in selection.split(",")}}
    result = _materialize(crash_dir, partial, selection=selection.split(","))
    assert result.success, _errors(result)
    meta = result.asset_materializations_for_node("anchor_responses")[0].metadata
    assert meta["shards_reused"].value == meta["shards_planned"].value == len(shards)
    assert meta["shards_computed"].value == 0 and meta["reused"].value == 0
    assert meta["generated"].value == meta["rows_loaded"].value == _counts(crash_dir)["anchor_responses"]
    assert not (crash_dir / "precompute").exists()

    def anchors(data_dir: Path) -> dict:
        con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
        try:
            return dict(
                con.execute("SELECT fingerprint || '/' || pair_id, anchor FROM anchor_responses").fetchall()
            )
        finally:
            con.close()

    assert anchors(crash_dir) == anchors(uninterrupted_dir)


# --- safe defaults --------------------------------------------------------------------------------------


def test_the_webserver_binds_localhost():
    makefile = (REPO / "Makefile").read_text()
    ui = [line for line in makefile.splitlines() if "dagster dev" in line]
    assert ui and all("-h 127.0.0.1" in line for line in ui)
    assert "0.0.0.0" not in makefile and "0.0.0.0" not in (REPO / "workspace.yaml").read_text()


def _config_classes():
    import tidpo_pipeline

    classes = []
    root = Path(tidpo_pipeline.__file__).parent
    for path in sorted(root.rglob("*.py")):
        name = ".".join(("tidpo_pipeline", *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        module = __import__(name, fromlist=["_"])
        classes += [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, dg.Config) and c.__module__ == module.__name__
        ]
    return classes


def test_remote_code_and_code_execution_are_off_by_default():
    from tidpo_core.evaluation.benchmarks import BenchmarkOptions

    assert inspect.signature(load_model_and_tokenizer).parameters["trust_remote_code"].default is False
    assert BenchmarkOptions().allow_code_execution is False
    risky = {"trust_remote_code", "allow_code_execution"}
    checked = 0
    for cls in _config_classes():
        for name in risky & set(cls.model_fields):
            assert cls.model_fields[name].default is False, f"{cls.__name__}.{name}"
            checked += 1
    assert checked >= 2


def test_models_load_from_safetensors_only(tmp_path):
    tokenizer = train_tokenizer(["hello world", "good answer", "bad answer"] * 5, vocab_size=300)
    model = build_tiny_model(
        tokenizer,
        TinyModelConfig(
            vocab_size=300,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
    )
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickled weights only
    with pytest.raises(OSError):
        load_model_and_tokenizer(tmp_path)
    save_model_and_tokenizer(model, tokenizer, tmp_path / "saved")
    assert [p.name for p in (tmp_path / "saved").glob("*.safetensors")] == ["model.safetensors"]
    assert not list((tmp_path / "saved").glob("*.bin"))
    load_model_and_tokenizer(tmp_path / "saved")


def test_no_pickle_is_ever_read_from_a_data_file(tmp_path):
    for name in ("rows.pkl", "rows.pickle", "rows.pt", "rows.bin"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04N.")  # a pickle
        assert not is_data_file(path)  # the inbox ignores it
        with pytest.raises(DataFileError, match="unsupported file type"):
            load_preferences(path)
    core = REPO / "tidpo_core"
    readers = [
        *sorted((core / "data").glob("*.py")),
        *sorted((core / "store").glob("*.py")),
        *sorted((core / "steps").glob("*.py")),
    ]
    assert len(readers) > 8
    for module in readers:
        source = module.read_text()
        assert "pickle" not in source and "torch.load" not in source, module
