"""An MLflow registry in a data dir with a registered model and N empty versions, for registry tests."""

from pathlib import Path

from tidpo_core.runtime import tracking

NAME = "tidpo-policy"


def registry_with_versions(data_dir: Path, versions: int, name: str = NAME) -> str:
    """Create `name` with `versions` versions (each from its own run) in `data_dir`'s store; returns its URI."""
    uri = tracking.sqlite_tracking_uri(data_dir)
    client = tracking.client(uri)
    client.create_registered_model(name)
    experiment = client.create_experiment("t", artifact_location=tracking.artifact_root(data_dir))
    for _ in range(versions):
        run = client.create_run(experiment)
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return uri
