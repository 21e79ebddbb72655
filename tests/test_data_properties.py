"""Property-based tests of the loaders: whatever lands in a data file, every row is either accepted or
quarantined with a reason, nothing is dropped, and no row crashes the load.

The generated files mix malformed JSON lines, wrong types, missing and extra keys, empty and
whitespace-only texts, chosen == rejected, invalid UTF-8, NUL bytes, 1 MB texts, duplicated pairs and
several row formats (explicit, conversational, HH, non-object JSON) in one file. Where a line's fate
is known from how it was built (a clean explicit row, a corrupted line), the test checks that fate;
for every line it checks the accounting and the invariants of what was accepted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidpo_core import store
from tidpo_core.data.files import load_preferences
from tidpo_core.data.formats import HH_ASSISTANT
from tidpo_core.data.pairs import DataFileError, LoadResult, QuarantineReason, make_pair_id
from tidpo_core.data.validation import RAW_MAX_CHARS, validate_rows

MB_TEXT = "x" * 1_000_000
REASONS = {str(r) for r in QuarantineReason}
# `make stress` raises the number of examples; `make test` keeps it quick.
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("TIDPO_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# --- strategies ---------------------------------------------------------------------------------------

special_texts = st.sampled_from(
    ["", " ", "\n\t  ", "\u3000\u00a0", "\x00", "a\x00b", "\ud800", "ok\udcff", "\ufeffbom", MB_TEXT, "\r\n"]
)
texts = st.one_of(
    st.text(max_size=24),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=24),
    special_texts,
)
wrong_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
roles = st.sampled_from(["user", "assistant", "system", "human", "tool", ""])
contents = st.one_of(
    texts,
    wrong_values,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2),
)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), max_size=4)


@dataclass(frozen=True)
class Line:
    """One physical line of a generated file and what must become of it, when that is known."""

    data: bytes
    expect: bool | None  # True: accepted, False: quarantined, None: either (but accounted for)
    triple: tuple[str, str, str] | None = None  # (prompt, chosen, rejected) of a clean explicit row


def _text_ok(text: str, max_chars: int) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text and bool(text.strip()) and len(text) <= max_chars


def _dump(row: Any, ensure_ascii: bool) -> bytes:
    # surrogatepass turns lone surrogates into bytes that are not valid UTF-8: one more way to be broken.
    return json.dumps(row, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


@st.composite
def explicit_rows(draw: st.DrawFn, max_chars: int) -> Line:
    fields: dict[str, Any] = {}
    for key in ("prompt", "chosen", "rejected"):
        kind = draw(st.sampled_from(["text", "text", "text", "wrong", "missing"]))
        if kind == "text":
            fields[key] = draw(texts)
        elif kind == "wrong":
            fields[key] = draw(wrong_values)
    if draw(st.booleans()) and isinstance(fields.get("prompt"), str):
        fields["rejected"] = fields["chosen"] = draw(texts)  # chosen == rejected
    extra = draw(
        st.dictionaries(st.text(max_size=6).filter(lambda k: k not in fields), json_values, max_size=3)
    )
    row = {**extra, **fields}
    ensure_ascii = draw(st.booleans())
    data = _dump(row, ensure_ascii)
    values = [fields.get(k) for k in ("prompt", "chosen", "rejected")]
    if any(HH_ASSISTANT in v for v in values if isinstance(v, str)) or set(extra) & {"meta", "meta_json"}:
        return Line(data, None)
    if not all(isinstance(v, str) for v in values):
        return Line(data, False)
    prompt, chosen, rejected = values
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return Line(data, False)
    ok = all(_text_ok(t, max_chars) for t in values) and chosen.strip() != rejected.strip()
    return Line(data, ok, (prompt, chosen, rejected) if ok else None)


@st.composite
def conversational_rows(draw: st.DrawFn) -> Line:
    shared = draw(messages)
    row: dict[str, Any] = {"chosen": shared + draw(messages), "rejected": shared + draw(messages)}
    if draw(st.booleans()):
        row["prompt"] = draw(st.one_of(texts, messages, wrong_values))
    return Line(_dump(row, draw(st.booleans())), None)


@st.composite
def hh_rows(draw: st.DrawFn) -> Line:
    human = draw(texts)
    chosen = f"\n\nHuman: {human}{HH_ASSISTANT} {draw(texts)}"
    rejected = f"\n\nHuman: {draw(st.sampled_from([human, 'other']))}{HH_ASSISTANT} {draw(texts)}"
    return Line(_dump({"chosen": chosen, "rejected": rejected}, draw(st.booleans())), None)


@st.composite
def other_json(draw: st.DrawFn) -> Line:
    value = draw(
        st.one_of(st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none())
    )
    return Line(json.dumps(value).encode(), False)


@st.composite
def corrupted(draw: st.DrawFn, line: Line) -> Line:
    """Break a JSON object line: truncate it, or splice in bytes that are not UTF-8 text or a raw NUL."""
    how = draw(st.sampled_from(["truncate", "bad_utf8", "nul"]))
    data = line.data
    if how == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        return Line(data[:cut], False) if data[:cut].strip() else Line(b"{", False)
    at = draw(st.integers(1, len(data) - 1))
    junk = (
        draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]))
        if how == "bad_utf8"
        else b"\x00"
    )
    return Line(data[:at] + junk + data[at:], False)


@st.composite
def jsonl_files(draw: st.DrawFn, max_chars: int) -> list[Line]:
    row = st.one_of(explicit_rows(max_chars), conversational_rows(), hh_rows(), other_json())
    lines: list[Line] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["row", "row", "row", "corrupt", "duplicate", "blank"]))
        if kind == "duplicate" and lines:
            lines.append(draw(st.sampled_from(lines)))
        elif kind == "blank":
            lines.append(Line(draw(st.sampled_from([b"", b"   ", b"\t", b"\r"])), None))
        else:
            line = draw(row)
            if kind == "corrupt" and line.data.startswith(b"{") and len(line.data) > 2:
                line = draw(corrupted(line))
            lines.append(line)
    return lines


def _expected_fates(lines: list[Line]) -> dict[int, bool]:
    """Physical line index -> must be accepted (True) / quarantined (False), duplicates resolved."""
    fates: dict[int, bool] = {}
    seen: set[tuple[str, str, str]] = set()
    for i, line in enumerate(lines):
        if not line.data.strip():
            continue
        if line.expect is True:
            assert line.triple is not None
            fates[i] = line.triple not in seen
            seen.add(line.triple)
        elif line.expect is False:
            fates[i] = False
    return fates


def _valid_json_line(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except ValueError:
        return False
    return True


def _check_result(result: LoadResult, rows_expected: int, max_chars: int, blank_expected: int = 0) -> None:
    assert result.rows_read == rows_expected
    assert result.skipped == ({"blank_line": blank_expected} if blank_expected else {})
    assert result.accepted + len(result.quarantined) + result.skipped_rows == rows_expected
    assert result.pair_lines is not None and len(result.pair_lines) == result.accepted
    assert len({p.pair_id for p in result.pairs}) == result.accepted
    for pair in result.pairs:
        assert pair.pair_id == make_pair_id(pair.prompt, pair.chosen, pair.rejected)
        for text in (pair.prompt, pair.chosen, pair.rejected):
            assert _text_ok(text, max_chars), repr(text[:80])
        assert pair.chosen.strip() != pair.rejected.strip()
        json.dumps(pair.meta).encode("utf-8")
    for q in result.quarantined:
        assert q.reason in REASONS
        assert q.detail
        assert len(q.raw) <= RAW_MAX_CHARS
        (q.detail + q.raw + q.source).encode("utf-8")  # storable as UTF-8 text
    assert 0.0 <= result.quarantine_share <= 1.0


def _check_store_round_trip(result: LoadResult) -> None:
    con = store.connect(":memory:")
    try:
        summary = store.replace_pairs(con, result, eval_fraction=0.2)
        assert summary.pairs == result.accepted and summary.quarantined == len(result.quarantined)
        assert con.execute("SELECT count(*) FROM quarantine").fetchone()[0] == len(result.quarantined)
        stored = {p.pair_id: p for p in store.read_pairs(con)}
        assert set(stored) == {p.pair_id for p in result.pairs}
        for pair in result.pairs:
            got = stored[pair.pair_id]
            assert (got.prompt, got.chosen, got.rejected) == (pair.prompt, pair.chosen, pair.rejected)
    finally:
        con.close()


# --- properties -------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    max_chars=st.sampled_from([20_000, 2_000_000]),
    suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".json"]),
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_jsonl_every_row_is_accepted_or_quarantined(tmp_path_factory, data, max_chars, suffix, bom, crlf):
    lines = data.draw(jsonl_files(max_chars))
    body = (b"\r\n" if crlf else b"\n").join(line.data for line in lines)
    body = (b"\xef\xbb\xbf" if bom else b"") + body
    path = tmp_path_factory.mktemp("prop") / f"rows{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)

    nonblank = [i for i, line in enumerate(lines) if line.data.strip()]
    try:
        result = load_preferences(path, max_chars=max_chars)
    except DataFileError as exc:
        # Only a file with no decodable JSON line at all may be refused as a whole, and it says which file.
        assert path.name in str(exc)
        assert not any(_valid_json_line(lines[i].data) for i in nonblank)
        return
    # A file that is one JSON array holds its elements as rows; anything else is one row per line.
    stripped = body[3:] if bom else body
    try:
        whole = json.loads(stripped.decode("utf-8")) if stripped.lstrip().startswith(b"[") else None
    except ValueError:
        whole = None
    if isinstance(whole, list):
        _check_result(result, len(whole), max_chars)
        return
    # Lines as an editor counts them: the newline that ends the file starts no line of its own.
    physical = len(lines) - (1 if lines and lines[-1].data == b"" else 0)
    _check_result(result, physical, max_chars, blank_expected=physical - len(nonblank))
    quarantined_lines = {q.line_1based for q in result.quarantined}
    assert sorted([*result.pair_lines, *quarantined_lines]) == [i + 1 for i in nonblank]
    for index, accepted in _expected_fates(lines).items():
        assert (index + 1 not in quarantined_lines) == accepted, (index, lines[index].data[:200])
    assert result.accepted >= sum(_expected_fates(lines).values())
    _check_store_round_trip(result)


@PROPERTY_SETTINGS
@given(data=st.data(), max_chars=st.sampled_from([20_000, 2_000_000]))
def test_json_array_file_rows_are_its_elements(tmp_path_factory, data, max_chars):
    rows = [
        json.loads(line.data.decode("utf-8", "surrogatepass"))
        for line in data.draw(jsonl_files(max_chars))
        if line.data.strip() and _valid_json_line(line.data)
    ]
    path = tmp_path_factory.mktemp("array") / "rows.json"
    path.write_text(json.dumps(rows, indent=data.draw(st.sampled_from([None, 1]))))
    result = load_preferences(path, max_chars=max_chars)
    _check_result(result, len(rows), max_chars)


cells = st.one_of(
    texts.filter(lambda t: len(t) < 100_000),
    st.sampled_from(
        [
            '"quoted, with comma"',
            "multi\nline",
            "\udcff\udcfe bad utf-8",
            '[{"role": broken',
            "[1, 2]",
            "null",
        ]
    ),
    st.just(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])),
)


@PROPERTY_SETTINGS
@given(
    records=st.lists(st.lists(cells, min_size=1, max_size=5), min_size=0, max_size=12),
    extra_column=st.booleans(),
    max_chars=st.sampled_from([20_000, 2_000_000]),
)
def test_csv_every_row_is_accepted_or_quarantined(tmp_path_factory, records, extra_column, max_chars):
    header = ["prompt", "chosen", "rejected"] + (["source_id"] if extra_column else [])
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    # Rows with the wrong number of fields are in the mix on purpose.
    writer.writerows(records)
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))  # surrogates: invalid UTF-8
    result = load_preferences(path, max_chars=max_chars)
    _check_result(result, len(records), max_chars)
    # The line each record starts on, counted independently of the reader: the header is line 1, and
    # every line break inside a quoted cell (\r\n, \r or \n) moves the next record down a line.
    starts, line = {}, 2
    for index, record in enumerate(records):
        starts[line] = index
        line += 1 + sum(len(re.findall(r"\r\n|\r|\n", cell)) for cell in record)
    for q in result.quarantined:
        record = records[starts[q.line_1based]]
        if len(record) != len(header):
            assert q.reason == QuarantineReason.MALFORMED
    _check_store_round_trip(result)


@PROPERTY_SETTINGS
@given(
    rows=st.lists(
        st.one_of(
            json_values,
            st.dictionaries(
                st.sampled_from(["prompt", "chosen", "rejected", "x"]),
                st.one_of(texts, wrong_values, messages),
            ),
        ),
        max_size=20,
    )
)
def test_validate_rows_never_raises_on_any_python_row(rows):
    # What datasets/parquet hand over after decoding: any JSON-like value, any mix of keys and types.
    result = validate_rows(enumerate(rows), source="fuzz", max_chars=20_000)
    _check_result(result, len(rows), 20_000)


# --- files that are not data at all -------------------------------------------------------------------


JUNK = {
    "binary.jsonl": os.urandom(4096) + b"\x00" * 64,
    "truncated.jsonl.gz": gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 200)[:60],
    "not_gzip.jsonl.gz": b"plain text pretending to be gzip",
    "png.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(512),
    "utf16.csv": "prompt,chosen,rejected\np,a,b\n".encode("utf-16"),
    "broken.parquet": b"PAR1" + os.urandom(256),
}


@pytest.mark.parametrize("name", sorted(JUNK))
def test_a_file_that_is_not_data_raises_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(JUNK[name])
    with pytest.raises(DataFileError, match=name.replace(".", r"\.")):
        load_preferences(path)


def test_a_text_row_with_a_nul_byte_is_quarantined_not_the_whole_csv(tmp_path):
    path = tmp_path / "one_nul.csv"
    path.write_text("prompt,chosen,rejected\nhello,good\x00answer,bad answer\nhi,fine,worse\n")
    result = load_preferences(path)
    assert result.accepted == 1 and [q.reason for q in result.quarantined] == [QuarantineReason.NUL_BYTE]


def test_a_file_of_megabyte_texts_loads_without_crashing(tmp_path):
    path = tmp_path / "big.jsonl"
    rows = [
        {"prompt": "p", "chosen": MB_TEXT, "rejected": "short"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    small = load_preferences(path)
    assert small.accepted == 1 and small.quarantined[0].reason == QuarantineReason.TOO_LONG
    assert len(small.quarantined[0].raw) <= RAW_MAX_CHARS
    large = load_preferences(path, max_chars=2_000_000)
    assert large.accepted == 2


def messy_file(path: Path) -> tuple[int, int]:
    """A fixed messy JSONL file for pipeline-level tests; returns (rows, expected quarantined)."""
    good = [
        {"prompt": f"Question {i}?", "chosen": f" good answer {i}", "rejected": f" bad answer {i}"}
        for i in range(30)
    ]
    lines = [json.dumps(r).encode() for r in good]
    bad = [
        b'{"prompt": "p", "chosen": "same", "rejected": "same"}',
        b'{"prompt": "p", "chosen": "   ", "rejected": "x"}',
        b'{"prompt": "p", "chosen": 3, "rejected": "x"}',
        b'{"prompt": "p", "chosen": "a\\u0000", "rejected": "x"}',
        b'{"prompt": "p", "chosen": "trunc',
        b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "x"}',
        b"[1, 2, 3]",
        json.dumps(good[0]).encode(),
    ]
    path.write_bytes(b"\n".join(lines + bad) + b"\n")
    return len(lines) + len(bad), len(bad)


def test_messy_file_fixture_counts(tmp_path):
    rows, bad = messy_file(tmp_path / "messy.jsonl")
    result = load_preferences(tmp_path / "messy.jsonl")
    assert (result.rows_read, len(result.quarantined)) == (rows, bad)


def test_the_quarantine_check_reports_the_share_of_a_messy_file(tmp_path):
    import dagster as dg

    from tidpo_pipeline.checks import ALL_CHECKS
    from tidpo_pipeline.definitions import ASSETS
    from tidpo_pipeline.resources import build_resources

    rows, bad = messy_file(tmp_path / "messy.jsonl")
    result = dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=build_resources(str(tmp_path / "data")),
        run_config={"ops": {"preference_pairs": {"config": {"source": str(tmp_path / "messy.jsonl")}}}},
        selection=["preference_pairs"],
        raise_on_error=False,
    )
    assert result.success
    meta = result.asset_materializations_for_node("preference_pairs")[0].metadata
    assert (meta["rows_read"].value, meta["accepted"].value, meta["quarantined"].value) == (
        rows,
        rows - bad,
        bad,
    )
    check = next(
        c for c in result.get_asset_check_evaluations() if c.check_name == "quarantine_share_below_limit"
    )
    assert check.metadata["quarantine_share"].value == pytest.approx(bad / rows)
    assert meta["quarantine_share"].value == pytest.approx(bad / rows)
    assert check.passed is (bad / rows <= 0.2)
