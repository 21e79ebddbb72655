"""A run ends quietly: nothing the project keeps alive makes a library complain at interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

MATERIALIZE_PAIRS = textwrap.dedent(
    """
    import sys
    import dagster as dg
    from tidpo_pipeline.assets.pairs import preference_pairs
    from tidpo_pipeline.resources import TidpoDuckDB, TidpoStorage

    data_dir = sys.argv[1]
    result = dg.materialize(
        [preference_pairs],
        resources={"storage": TidpoStorage(data_dir=data_dir), "duckdb": TidpoDuckDB(database=data_dir + "/tidpo.duckdb")},
        run_config={"ops": {"preference_pairs": {"config": {"synthetic_pairs": 40}}}},
    )
    assert result.success
    """
)


def test_a_materialization_exits_without_duckdb_leak_reports(tmp_path):
    # DuckDB's nanobind bindings list every object still alive at shutdown; a module-level typing alias
    # over DuckDB's connection class once made every run end with ~40 such lines.
    finished = subprocess.run(
        [sys.executable, "-c", MATERIALIZE_PAIRS, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "nanobind" not in finished.stderr, finished.stderr[-2000:]
    assert "leaked" not in finished.stdout + finished.stderr
