"""Tests for tidpo_core.data.pairs: formats, quarantine reasons, file-level failures, ids and splits."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from tidpo_core.data.files import load_preferences
from tidpo_core.data.formats import chat_template_renderer, split_hh_dialogue
from tidpo_core.data.pairs import (
    DataFileError,
    DataRowError,
    LoadResult,
    PreferencePair,
    QuarantineReason,
    assign_split,
    make_pair_id,
)
from tidpo_core.data.synthetic import generate_synthetic_pairs  # noqa: E402
from tidpo_core.data.validation import validate_rows

HH_DATA = Path(__file__).parent.parent.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

EXPLICIT = {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}
HH_ROW = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it 9 minutes.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are overrated.",
}
CONV_EXPLICIT = {
    "prompt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "chosen": [{"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "assistant", "content": "Lyon."}],
}
CONV_IMPLICIT = {
    "chosen": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Largest planet?"},
        {"role": "assistant", "content": "Jupiter."},
    ],
    "rejected": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Largest planet?"},
        {"role": "assistant", "content": "Mars."},
    ],
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def validate(rows: list[Any], **kwargs: Any) -> LoadResult:
    return validate_rows(enumerate(rows, start=1), source="test", **kwargs)


def fake_template(messages: list[dict]) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


# --- ids and splits ---------------------------------------------------------------------------


def test_make_pair_id_matches_hand_computed_hash() -> None:
    expected = hashlib.sha256(json.dumps(["What is 2+2?", " 4", " 5"]).encode("utf-8")).hexdigest()[:16]
    assert expected == "5f60889747290239"
    assert make_pair_id("What is 2+2?", " 4", " 5") == "5f60889747290239"


def test_make_pair_id_is_sensitive_to_each_field() -> None:
    base = make_pair_id("p", "c", "r")
    variants = {make_pair_id("p!", "c", "r"), make_pair_id("p", "c!", "r"), make_pair_id("p", "c", "r!")}
    variants.add(make_pair_id("p", "r", "c"))  # swapping chosen/rejected is a different pair
    assert base not in variants and len(variants) == 4
    assert len(base) == 16 and int(base, 16) >= 0


def test_assign_split_is_deterministic_and_near_fraction() -> None:
    ids = [p.pair_id for p in generate_synthetic_pairs(2000, seed=0)]
    splits = [assign_split(i) for i in ids]
    assert splits == [assign_split(i) for i in ids]
    share = splits.count("eval") / len(splits)
    assert 0.07 <= share <= 0.13
    assert assign_split("0000000000000000") == "eval"
    assert assign_split("ffffffffffffffff") == "train"
    assert all(assign_split(i, eval_fraction=0.0) == "train" for i in ids[:50])


# --- HH dialogue splitting ----------------------------------------------------------------------


def test_split_hh_dialogue_multi_turn_keeps_prefix_identity() -> None:
    prompt, chosen, rejected = split_hh_dialogue(HH_ROW["chosen"], HH_ROW["rejected"])
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert chosen == " Simmer it 9 minutes."
    assert rejected == " Eggs are overrated."
    assert prompt + chosen == HH_ROW["chosen"]
    assert prompt + rejected == HH_ROW["rejected"]


def test_split_hh_dialogue_single_turn() -> None:
    prompt, chosen, rejected = split_hh_dialogue(
        "\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant:  B"
    )
    assert (prompt, chosen, rejected) == ("\n\nHuman: Q\n\nAssistant:", " A", "  B")


@pytest.mark.parametrize(
    ("chosen", "rejected", "match"),
    [
        ("\n\nHuman: Q only", "\n\nHuman: Q\n\nAssistant: B", "chosen transcript has no"),
        ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q, no answer", "rejected transcript has no"),
        ("\n\nHuman: Q1\n\nAssistant: A", "\n\nHuman: Q2\n\nAssistant: B", "differ"),
        # rejected carries on with an extra turn: its last Assistant turn has a different prefix
        (
            "\n\nHuman: Q\n\nAssistant: A",
            "\n\nHuman: Q\n\nAssistant: B\n\nHuman: more\n\nAssistant: C",
            "differ",
        ),
    ],
)
def test_split_hh_dialogue_rejects_bad_transcripts(chosen: str, rejected: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_hh_dialogue(chosen, rejected)


# --- formats ------------------------------------------------------------------------------------


def test_explicit_jsonl(tmp_path: Path) -> None:
    result = load_preferences(write_jsonl(tmp_path / "prefs.jsonl", [EXPLICIT]))
    assert (result.rows_read, result.accepted, result.quarantined) == (1, 1, [])
    pair = result.pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected, pair.source) == (
        "What is 2+2?",
        " 4",
        " 5",
        "prefs.jsonl",
    )
    assert pair.pair_id == make_pair_id("What is 2+2?", " 4", " 5")


def test_gzipped_jsonl_and_source_name(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(EXPLICIT) + "\n" + json.dumps(HH_ROW) + "\n")
    result = load_preferences(path, source_name="my-data")
    assert result.accepted == 2 and {p.source for p in result.pairs} == {"my-data"}


def test_whole_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([EXPLICIT, HH_ROW, 7]), encoding="utf-8")
    result = load_preferences(path)
    assert (result.rows_read, result.accepted) == (3, 2)
    assert result.quarantined[0].reason == QuarantineReason.MALFORMED


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([EXPLICIT, {"prompt": "Q", "chosen": " a", "rejected": " b"}]), path)
    result = load_preferences(path)
    assert result.accepted == 2 and result.pairs[1].chosen == " a"


def test_parquet_conversational_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist([CONV_IMPLICIT]), path)
    result = load_preferences(path)
    assert result.accepted == 1 and result.pairs[0].chosen == " Jupiter."


def test_csv_explicit_and_conversational(tmp_path: Path) -> None:
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "chosen", "rejected", "score"])
        writer.writerow([EXPLICIT["prompt"], EXPLICIT["chosen"], EXPLICIT["rejected"], "0.5"])
        writer.writerow(["Multi\nline, quoted", "yes", "no", "1"])
        writer.writerow(
            [
                json.dumps(CONV_EXPLICIT["prompt"]),
                json.dumps(CONV_EXPLICIT["chosen"]),
                json.dumps(CONV_EXPLICIT["rejected"]),
                "2",
            ]
        )
        writer.writerow(["too", "few"])
    result = load_preferences(path)
    assert (result.rows_read, result.accepted) == (4, 3)
    assert result.pairs[1].prompt == "Multi\nline, quoted"
    assert result.pairs[0].meta == {"extra": {"score": "0.5"}}
    assert result.pairs[2].prompt.endswith("\n\nHuman: Capital of France?\n\nAssistant:")
    assert result.pairs[2].chosen == " Paris."
    # Header on line 1; the second record's quoted prompt spans lines 3-4, so the short record is on line 6.
    assert [(q.line_1based, q.reason) for q in result.quarantined] == [(6, "malformed_row")]
    assert result.pair_lines == [2, 3, 5]


def test_conversational_explicit_prompt_plain_rendering() -> None:
    result = validate([CONV_EXPLICIT])
    pair = result.pairs[0]
    assert pair.prompt == "\n\nSystem: Be brief.\n\nHuman: Capital of France?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Paris.", " Lyon.")


def test_conversational_explicit_prompt_with_chat_template() -> None:
    pair = validate([CONV_EXPLICIT], chat_template=fake_template).pairs[0]
    assert pair.prompt == "<|system|>Be brief.<|user|>Capital of France?<|assistant|>"
    # With a real template the response follows the generation prompt directly: no added space.
    assert (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")


def test_conversational_implicit_prompt() -> None:
    pair = validate([CONV_IMPLICIT]).pairs[0]
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Largest planet?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Jupiter.", " Mars.")
    templated = validate([CONV_IMPLICIT], chat_template=fake_template).pairs[0]
    assert templated.prompt == "<|user|>Hi<|assistant|>Hello!<|user|>Largest planet?<|assistant|>"
    assert templated.chosen == "Jupiter."


def test_conversational_prompt_repeated_inside_responses_and_string_prompt() -> None:
    full = {
        "prompt": CONV_EXPLICIT["prompt"],
        "chosen": CONV_EXPLICIT["prompt"] + CONV_EXPLICIT["chosen"],
        "rejected": CONV_EXPLICIT["prompt"] + CONV_EXPLICIT["rejected"],
    }
    string_prompt = {
        "prompt": "Capital of Italy?",
        "chosen": CONV_EXPLICIT["chosen"],
        "rejected": [{"role": "assistant", "content": "Milan."}],
    }
    result = validate([full, string_prompt])
    assert result.accepted == 2
    assert result.pairs[0].chosen == " Paris."
    assert result.pairs[1].prompt == "\n\nHuman: Capital of Italy?\n\nAssistant:"


def test_hh_transcripts() -> None:
    pair = validate([HH_ROW]).pairs[0]
    assert pair.prompt.endswith("\n\nAssistant:")
    assert pair.prompt + pair.chosen == HH_ROW["chosen"]


def test_local_folder_via_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    # Keep datasets' Arrow cache inside the test's tmp dir instead of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "my_prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [EXPLICIT, {"prompt": "Q", "chosen": " a", "rejected": " a"}])
    result = load_preferences(folder)
    assert (result.rows_read, result.accepted) == (2, 1)
    assert result.pairs[0].source == "my_prefs"
    assert result.quarantined[0].reason == QuarantineReason.CHOSEN_EQUALS_REJECTED


def test_meta_and_extra_keys() -> None:
    row = {**EXPLICIT, "meta": {"origin": "x"}, "score": 3, "blob": "z" * 5000, "skip": None}
    pair = validate([row]).pairs[0]
    assert pair.meta == {"origin": "x", "extra": {"score": 3}}
    json.dumps(pair.meta)


def test_to_row_from_row_round_trip_and_revalidation() -> None:
    pair = validate_rows([(0, {**EXPLICIT, "meta": {"k": [1, 2]}})], source="s").pairs[0]
    row = pair.to_row()
    assert set(row) == {"pair_id", "prompt", "chosen", "rejected", "source", "meta_json"}
    assert row["meta_json"] == json.dumps({"k": [1, 2]}, sort_keys=True)
    assert PreferencePair.from_row(row) == pair
    # Rows written by to_row load back unchanged (meta restored, id and source not treated as extras).
    again = validate_rows([(0, row)], source="s").pairs[0]
    assert again == pair


def test_chat_template_renderer() -> None:
    class Tok:
        chat_template = "{{ whatever }}"

        def apply_chat_template(self, msgs: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
            assert tokenize is False and add_generation_prompt is True
            return fake_template(msgs)

    class NoTemplate:
        chat_template = None

    render = chat_template_renderer(Tok())
    assert render is not None and render([{"role": "user", "content": "hi"}]) == "<|user|>hi<|assistant|>"
    assert chat_template_renderer(NoTemplate()) is None


# --- quarantine ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (DataRowError("invalid JSON: x", b"{oops"), QuarantineReason.MALFORMED),
        (b"\xff\xfe", QuarantineReason.MALFORMED),
        ([1, 2], QuarantineReason.MALFORMED),
        ({"prompt": "Q", "chosen": " a"}, QuarantineReason.MISSING_FIELD),
        ({"prompt": "Q"}, QuarantineReason.MISSING_FIELD),
        ({"chosen": "plain a", "rejected": "plain b"}, QuarantineReason.MISSING_FIELD),
        ({"prompt": "Q", "chosen": 5, "rejected": " b"}, QuarantineReason.NOT_TEXT),
        ({"prompt": {"q": 1}, "chosen": " a", "rejected": " b"}, QuarantineReason.NOT_TEXT),
        (
            {
                "prompt": [{"role": "user", "content": 3}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [],
            },
            QuarantineReason.NOT_TEXT,
        ),
        ({"prompt": "Q", "chosen": "   \n", "rejected": " b"}, QuarantineReason.EMPTY_TEXT),
        ({"prompt": "", "chosen": " a", "rejected": " b"}, QuarantineReason.EMPTY_TEXT),
        ({"prompt": "Q", "chosen": " same ", "rejected": "same"}, QuarantineReason.CHOSEN_EQUALS_REJECTED),
        ({"prompt": "Q", "chosen": " a" * 60, "rejected": " b"}, QuarantineReason.TOO_LONG),
        ({"prompt": "Q", "chosen": " a\x00", "rejected": " b"}, QuarantineReason.NUL_BYTE),
        ({"text": "just some text"}, QuarantineReason.UNRECOGNIZED_FORMAT),
        (
            {"prompt": "Q", "chosen": " a", "rejected": [{"role": "assistant", "content": "b"}]},
            QuarantineReason.UNRECOGNIZED_FORMAT,
        ),
        (
            {"chosen": "\n\nHuman: Q1\n\nAssistant: a", "rejected": "\n\nHuman: Q2\n\nAssistant: b"},
            QuarantineReason.UNRECOGNIZED_FORMAT,
        ),
        (
            {"chosen": [{"role": "user", "content": "A"}], "rejected": [{"role": "user", "content": "B"}]},
            QuarantineReason.MISSING_FIELD,
        ),
        ({"prompt": "Q", "chosen": " a\udc80", "rejected": " b"}, QuarantineReason.MALFORMED),
    ],
)
def test_each_quarantine_reason(raw: Any, reason: QuarantineReason) -> None:
    result = validate([raw], max_chars=100)
    assert result.accepted == 0 and result.rows_read == 1
    (q,) = result.quarantined
    assert q.reason == reason, q.detail
    assert q.detail and q.source == "test" and q.line_1based == 1
    q.raw.encode("utf-8")  # always storable


def test_duplicate_pair_is_quarantined() -> None:
    result = validate([EXPLICIT, {"other": 1}, dict(EXPLICIT)])
    assert result.accepted == 1
    assert [(q.line_1based, q.reason) for q in result.quarantined] == [
        (2, "unrecognized_format"),
        (3, "duplicate_pair"),
    ]
    assert "line 1" in result.quarantined[1].detail


def test_quarantined_raw_is_truncated() -> None:
    result = validate([{"prompt": "Q", "chosen": "x" * 5000, "rejected": " b"}], max_chars=100)
    assert len(result.quarantined[0].raw) == 2000


def test_mixed_file_with_bad_lines_counts_reconcile(tmp_path: Path) -> None:
    lines = [
        json.dumps(EXPLICIT).encode(),
        json.dumps(HH_ROW).encode(),
        b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}',  # invalid UTF-8 (latin-1 byte)
        b'{"prompt": "Q", "chosen": " a", ',  # truncated JSON
        b"",  # blank lines are not rows
        json.dumps(CONV_IMPLICIT).encode(),
        json.dumps({"prompt": "Q", "chosen": " a", "rejected": " a"}).encode(),
        json.dumps(EXPLICIT).encode(),
        b"42",
        json.dumps(CONV_EXPLICIT).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = load_preferences(path)
    # Every physical line is read; the blank one is skipped with a reason, and lines count from 1.
    assert result.rows_read == 10 and result.skipped == {"blank_line": 1}
    assert result.accepted + len(result.quarantined) + result.skipped_rows == result.rows_read
    assert result.accepted == 4 and result.pair_lines == [1, 2, 6, 10]
    assert {(q.line_1based, q.reason) for q in result.quarantined} == {
        (3, "malformed_row"),
        (4, "malformed_row"),
        (7, "chosen_equals_rejected"),
        (8, "duplicate_pair"),
        (9, "malformed_row"),
    }
    assert result.reason_counts() == {"chosen_equals_rejected": 1, "duplicate_pair": 1, "malformed_row": 3}
    assert result.quarantine_share == pytest.approx(5 / 9)  # of the 9 lines that hold data
    assert "UTF-8" in result.quarantined[0].detail


def test_load_result_invariant() -> None:
    with pytest.raises(ValueError, match="silently dropped"):
        LoadResult(pairs=[], quarantined=[], rows_read=1)
    empty = LoadResult(pairs=[], quarantined=[], rows_read=0)
    assert empty.quarantine_share == 0.0 and empty.reason_counts() == {}


# --- file-level failures ------------------------------------------------------------------------


def test_binary_junk_raises_data_file_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(random.Random(0).randbytes(8192))
    with pytest.raises(DataFileError, match="junk.jsonl"):
        load_preferences(path)


def test_truncated_gzip_raises_data_file_error(tmp_path: Path) -> None:
    blob = gzip.compress(("".join(json.dumps({**EXPLICIT, "i": i}) + "\n" for i in range(500))).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFileError, match="cut.jsonl.gz"):
        load_preferences(path)


def test_not_gzip_but_named_gz_raises(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl.gz"
    path.write_text(json.dumps(EXPLICIT) + "\n")
    with pytest.raises(DataFileError, match="plain.jsonl.gz"):
        load_preferences(path)


def test_corrupted_parquet_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + random.Random(1).randbytes(300))
    with pytest.raises(DataFileError, match="broken.parquet"):
        load_preferences(path)


def test_unsupported_extension_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataFileError, match="notes.txt"):
        load_preferences(path)


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preferences(tmp_path / "nope.jsonl")


def test_text_file_of_bad_json_is_quarantined_not_raised(tmp_path: Path) -> None:
    # Valid text that is not JSON is still "data with bad rows": the report shows them all.
    path = tmp_path / "wrong.jsonl"
    path.write_text("prompt,chosen,rejected\nQ,a,b\n")
    result = load_preferences(path)
    assert result.rows_read == 2 and result.reason_counts() == {"malformed_row": 2}


# --- real data ----------------------------------------------------------------------------------


def test_real_hh_rlhf_harmless_test_split() -> None:
    if not HH_DATA.exists():
        pytest.skip(f"real data not available at {HH_DATA}")
    result = load_preferences(HH_DATA)
    assert result.rows_read == 2312
    assert result.accepted + len(result.quarantined) == 2312
    assert result.accepted >= 2250
    counts = result.reason_counts()
    assert counts and sum(counts.values()) == len(result.quarantined)
    assert set(counts) <= {r.value for r in QuarantineReason}
    assert all(p.prompt.endswith("\n\nAssistant:") for p in result.pairs)
    assert all(p.prompt.startswith("\n\nHuman:") for p in result.pairs)
    assert len({p.pair_id for p in result.pairs}) == result.accepted


def test_keep_at_most_is_a_seeded_subset_in_order_and_accounts_for_the_rest() -> None:
    from tidpo_core.data.sources import keep_at_most

    rows = [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(10)] + [{"nope": 1}]
    result = validate(rows)
    kept = keep_at_most(result, 4, seed=3)
    assert kept.accepted == 4 and kept.skipped == {"beyond_max_pairs": 6}
    assert kept.accepted + len(kept.quarantined) + kept.skipped_rows == kept.rows_read == 11
    assert kept.pair_lines == sorted(kept.pair_lines)  # original order
    assert [p.prompt for p in kept.pairs] == [
        p.prompt for p in keep_at_most(result, 4, seed=3).pairs
    ]  # deterministic
    assert [p.prompt for p in kept.pairs] != [p.prompt for p in keep_at_most(result, 4, seed=4).pairs]
    assert keep_at_most(result, None) is result and keep_at_most(result, 50) is result
    with pytest.raises(ValueError, match="max_pairs"):
        keep_at_most(result, 0)
