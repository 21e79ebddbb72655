"""The tidpo asset graph: pairs -> reference model -> anchors -> token weights -> policy -> evaluation.

Assets are thin: they read configuration, call tidpo_core, and record metadata and lineage. Each
returns a small handle (paths, fingerprints, run ids) that downstream assets receive as input; the
data itself lives in DuckDB, model folders and MLflow.
"""
