"""The evaluation asset: held-out metrics of the trained policy vs its reference, and the gate that
decides the MLflow `champion` alias."""

import dagster as dg
from mlflow import MlflowClient

from tidpo_core import store, tracking
from tidpo_core.evaluation import gate_decision, preference_metrics, score_pairs
from tidpo_core.features import EncodingSettings
from tidpo_core.modeling import load_model_and_tokenizer
from tidpo_pipeline.metadata import GROUP, markdown_table
from tidpo_pipeline.resources import MlflowTracking, QualityPolicy, TidpoDuckDB

# --- evaluation ------------------------------------------------------------------------------------


class EvaluationConfig(dg.Config):
    batch_size: int = 32


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "mlflow"},
    description="Held-out preference metrics of the trained policy vs the reference; the gate that decides the champion alias.",
    check_specs=[dg.AssetCheckSpec("evaluation_gate", asset="evaluation", description="trained metric >= reference metric + margin; only then the model becomes champion")],
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    reference_model: dict,
    tidpo_policy: dict,
    duckdb: TidpoDuckDB,
    mlflow_tracking: MlflowTracking,
    quality: QualityPolicy,
):
    settings = EncodingSettings(**tidpo_policy["encoding"])
    with duckdb.get_connection() as con:
        pairs = store.read_pairs(con, split="eval")
    reference, tokenizer = load_model_and_tokenizer(reference_model["path"])
    policy, _ = load_model_and_tokenizer(tidpo_policy["model_path"])
    reference_scores = score_pairs(reference, tokenizer, pairs, settings, config.batch_size, progress=True)
    policy_scores = score_pairs(policy, tokenizer, pairs, settings, config.batch_size, progress=True)
    beta = tidpo_policy["beta"]
    metrics = {
        "reference": preference_metrics(reference_scores, reference_scores, beta),
        "policy": preference_metrics(policy_scores, reference_scores, beta),
    }
    gate = gate_decision(metrics["policy"], metrics["reference"], quality.gate_metric, quality.gate_margin)
    run_id = tidpo_policy["mlflow_run_id"]
    with duckdb.get_connection() as con:
        store.write_metrics(con, run_id, metrics)
    client = MlflowClient(tracking_uri=mlflow_tracking.uri)
    for model, values in metrics.items():
        for name, value in values.items():
            client.log_metric(run_id, f"eval/{model}/{name}", value)
    client.log_metric(run_id, "eval/gate_passed", float(gate.passed))
    champion = False
    version = tidpo_policy.get("model_version")
    if gate.passed and version:
        tracking.set_champion(mlflow_tracking.uri, version, mlflow_tracking.registered_model)
        champion = True
    elif version:
        client.set_model_version_tag(mlflow_tracking.registered_model, str(version), "gate", "failed")
    rows = [{"metric": k, "reference": f"{metrics['reference'][k]:.4f}", "policy": f"{metrics['policy'][k]:.4f}"} for k in metrics["policy"]]
    return dg.MaterializeResult(
        value={"metrics": metrics, "gate_passed": gate.passed, "champion": champion},
        metadata={
            "comparison": dg.MetadataValue.md(markdown_table(rows)),
            **{f"policy/{k}": v for k, v in metrics["policy"].items()},
            **{f"reference/{k}": v for k, v in metrics["reference"].items()},
            "gate": gate.description,
            "champion": champion,
            "mlflow_run_id": run_id,
            "mlflow_model_version": str(version),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="evaluation_gate",
                passed=gate.passed,
                metadata={"description": gate.description, "metric": quality.gate_metric, "margin": quality.gate_margin},
            )
        ],
    )
