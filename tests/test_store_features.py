"""DuckDB storage (atomic, idempotent writes) and the features that feed training."""

import duckdb
import numpy as np
import pytest
import torch

from tidpo_core import store
from tidpo_core.batching.features import (
    EncodingSettings,
    TrainingCollator,
    WeightMismatchError,
    build_features,
    encode_response,
    stack_sides,
)
from tidpo_core.batching.tokenization import tokens_overlapping
from tidpo_core.data.pairs import LoadResult, PreferencePair, QuarantinedRow, QuarantineReason, make_pair_id
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.method.importance import compute_token_importance, hybrid_weights
from tidpo_core.method.logps import token_logps
from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer
from tidpo_core.runtime.fingerprint import text_digest

SETTINGS = EncodingSettings(max_prompt_tokens=64, max_response_tokens=64)


def _pair(i: int) -> PreferencePair:
    prompt, chosen, rejected = f"q{i}", f"good {i}", f"bad {i}"
    return PreferencePair(make_pair_id(prompt, chosen, rejected), prompt, chosen, rejected, "test")


@pytest.fixture(scope="module")
def tiny():
    pairs = generate_synthetic_pairs(24, seed=3)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=400)
    config = TinyModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return pairs, tokenizer, build_tiny_model(tokenizer, config, seed=0)


def test_replace_pairs_is_idempotent_and_keeps_quarantine(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    bad = QuarantinedRow("f.jsonl", 3, QuarantineReason.EMPTY_TEXT, "chosen is empty", "{}")
    result = LoadResult(pairs=[_pair(i) for i in range(10)], quarantined=[bad], rows_read=11)
    for _ in range(3):
        summary = store.replace_pairs(con, result, eval_fraction=0.3)
    assert con.execute("SELECT count(*) FROM preference_pairs").fetchone()[0] == 10
    assert con.execute("SELECT reason, detail FROM quarantine").fetchall() == [
        ("empty_text", "chosen is empty")
    ]
    assert summary.train + summary.eval == 10
    assert [p.pair_id for p in store.read_pairs(con)] == sorted(p.pair_id for p in result.pairs)


def test_a_store_numbering_quarantine_from_zero_is_renumbered_from_one(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE quarantine (source VARCHAR, row_number BIGINT, reason VARCHAR, detail VARCHAR, raw VARCHAR, loaded_at TIMESTAMP)"
    )
    con.execute(
        "INSERT INTO quarantine VALUES ('a.jsonl', 0, 'malformed_row', 'x', '{', NULL), ('a.jsonl', 4, 'duplicate_pair', 'y', '{}', NULL)"
    )
    con.close()
    for _ in range(2):  # the migration runs once, however often the store is opened
        con = store.connect(path)
        assert con.execute("SELECT line_1based FROM quarantine ORDER BY line_1based").fetchall() == [
            (1,),
            (5,),
        ]
        con.close()


def test_failed_write_leaves_previous_state(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    store.replace_pairs(con, LoadResult([_pair(1)], [], 1), 0.1)
    with pytest.raises(duckdb.Error):
        with store.transaction(con):
            con.execute("DELETE FROM preference_pairs")
            con.execute("INSERT INTO preference_pairs (pair_id) VALUES ('x')")  # NOT NULL columns missing
    assert con.execute("SELECT count(*) FROM preference_pairs").fetchone()[0] == 1


def test_token_weights_round_trip_and_replacement(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    row = {
        "pair_id": "p1",
        "side": "chosen",
        "text_digest": "d1",
        "token_ids": [5, 6, 7],
        "attribution": [0.1, 0.2, 0.3],
        "prior": [0.5, 1.0, 0.5],
        "weight": [0.8, 1.2, 1.0],
        "reference_logp": [-1.0, -2.0, -3.0],
    }
    store.write_token_weights(con, "fp", [row])
    store.write_token_weights(
        con,
        "fp",
        [
            {**row, "text_digest": "d2", "token_ids": [9, 8]}
            | {k: row[k][:2] for k in ("attribution", "prior", "weight", "reference_logp")}
        ],
    )
    assert con.execute("SELECT count(*) FROM token_weights").fetchone()[0] == 2
    stored = store.read_token_weights(con, "fp")[("p1", "chosen")]
    assert stored.token_ids.tolist() == [9, 8]
    assert stored.reference_logp.tolist() == pytest.approx([-1.0, -2.0])
    assert store.existing_weight_keys(con, "fp") == {("p1", "chosen", "d2")}
    with pytest.raises(ValueError, match="weight has 1 values for 3 tokens"):
        store.write_token_weights(con, "fp", [{**row, "weight": [1.0]}])


def test_table_digest_changes_with_content(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    store.replace_pairs(con, LoadResult([_pair(1), _pair(2)], [], 2), 0.1)
    first = store.table_digest(con, "SELECT pair_id FROM preference_pairs")
    store.replace_pairs(con, LoadResult([_pair(1), _pair(3)], [], 2), 0.1)
    assert store.table_digest(con, "SELECT pair_id FROM preference_pairs") != first


def test_reference_logps_from_the_attribution_pass_equal_a_plain_forward(tiny):
    pairs, tokenizer, model = tiny
    encoded = [encode_response(tokenizer, p.prompt, p.chosen, SETTINGS) for p in pairs[:5]]
    importances = compute_token_importance(model, encoded, batch_size=2)
    for enc, imp in zip(encoded, importances, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits
        expected = token_logps(logits, torch.tensor([enc.input_ids]))[0][torch.tensor(enc.response_mask) == 1]
        np.testing.assert_allclose(imp.reference_logp, expected.numpy(), atol=1e-5)


def test_synthetic_critical_span_aligns_with_response_tokens(tiny):
    pairs, tokenizer, _ = tiny
    for pair in pairs:
        for side in ("chosen", "rejected"):
            text = getattr(pair, side)
            start, end = pair.meta[f"{side}_span"]
            enc = encode_response(tokenizer, pair.prompt, text, EncodingSettings(64, 512))
            assert enc.response_length < 512, "the whole answer must be encoded for this check"
            span_tokens = tokens_overlapping(enc.response_offsets, (start, end))
            assert span_tokens, pair.pair_id
            response_ids = [t for t, m in zip(enc.input_ids, enc.response_mask, strict=True) if m]
            decoded = tokenizer.decode([response_ids[i] for i in span_tokens])
            assert pair.meta[f"{side}_phrase"] in decoded


def _stored_for(pairs, tokenizer, model, anchors=None):
    stored = {}
    for pair in pairs:
        texts = {"chosen": pair.chosen, "rejected": pair.rejected} | (
            {"anchor": anchors[pair.pair_id]} if anchors else {}
        )
        for side, text in texts.items():
            enc = encode_response(tokenizer, pair.prompt, text, SETTINGS)
            imp = compute_token_importance(model, [enc])[0]
            stored[(pair.pair_id, side)] = store.StoredWeights(
                [t for t, m in zip(enc.input_ids, enc.response_mask, strict=True) if m],
                imp.attribution.tolist(),
                imp.prior.tolist(),
                imp.weight.tolist(),
                imp.reference_logp.tolist(),
            )
    return stored


def test_build_features_recombines_weights_with_the_requested_lambda(tiny):
    pairs, tokenizer, model = tiny
    stored = _stored_for(pairs[:3], tokenizer, model)
    for lambda_ in (0.0, 0.7, 1.0):
        features = build_features(tokenizer, pairs[:3], SETTINGS, stored=stored, lambda_=lambda_)
        for feature, pair in zip(features, pairs[:3], strict=True):
            expected = hybrid_weights(torch.tensor(stored[(pair.pair_id, "chosen")].attribution), lambda_)
            np.testing.assert_allclose(feature["chosen_weights"], expected.numpy(), rtol=1e-6)
            np.testing.assert_array_equal(
                feature["chosen_reference_logps"], np.float32(stored[(pair.pair_id, "chosen")].reference_logp)
            )
    uniform = build_features(tokenizer, pairs[:1], SETTINGS, stored=stored, uniform_weights=True)[0]
    assert set(uniform["rejected_weights"]) == {1.0}


def test_build_features_refuses_weights_of_other_tokens(tiny):
    pairs, tokenizer, model = tiny
    stored = _stored_for(pairs[:1], tokenizer, model)
    key = (pairs[0].pair_id, "chosen")
    stored[key] = store.StoredWeights(
        stored[key].token_ids[:-1],
        *(
            v[:-1]
            for v in (
                stored[key].attribution,
                stored[key].prior,
                stored[key].weight,
                stored[key].reference_logp,
            )
        ),
    )
    with pytest.raises(WeightMismatchError, match="tokenizer or truncation changed"):
        build_features(tokenizer, pairs[:1], SETTINGS, stored=stored)
    with pytest.raises(KeyError, match="no anchor response"):
        build_features(tokenizer, pairs[:1], SETTINGS, anchors={})


def test_collator_and_stacking_keep_reference_logps_aligned(tiny):
    pairs, tokenizer, model = tiny
    anchors = {p.pair_id: " an anchor answer" for p in pairs[:4]}
    stored = _stored_for(pairs[:4], tokenizer, model, anchors)
    features = build_features(tokenizer, pairs[:4], SETTINGS, anchors=anchors, stored=stored)
    sides = ("chosen", "rejected", "anchor")
    batch = TrainingCollator(tokenizer.pad_token_id, sides)(features)
    stacked = stack_sides(batch, sides, tokenizer.pad_token_id)
    assert stacked["input_ids"].shape[0] == 12
    with torch.no_grad():
        logits = model(input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"]).logits
    recomputed = token_logps(logits, stacked["input_ids"]) * stacked["response_mask"]
    torch.testing.assert_close(recomputed, stacked["reference_logps"], atol=1e-4, rtol=1e-4)
    assert torch.all(stacked["weights"][stacked["response_mask"] == 0] == 0)
    assert text_digest("a") != text_digest("b")


def test_token_weights_read_by_id_range_equal_the_full_read(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    rows = [
        {
            "pair_id": pid,
            "side": side,
            "text_digest": "d",
            "token_ids": [1, 2, 3],
            "attribution": [0.1, 0.2, 0.3],
            "prior": [0.5, 1.0, 0.5],
            "weight": [0.8, 1.2, 1.0],
            "reference_logp": [-1.0, -2.0, -3.0],
        }
        for pid in ("a", "b", "c", "d")
        for side in ("chosen", "rejected")
    ]
    store.write_token_weights(con, "fp", rows)
    full = store.read_token_weights(con, "fp")
    ranged = store.read_token_weights(con, "fp", pair_id_range=("b", "c"))
    assert set(ranged) == {(p, s) for p in ("b", "c") for s in ("chosen", "rejected")}
    for key, value in ranged.items():
        for name in ("token_ids", "attribution", "prior", "weight", "reference_logp"):
            np.testing.assert_array_equal(getattr(value, name), getattr(full[key], name))
    assert set(store.read_token_weights(con, "fp", ["a", "d"])) == {
        (p, s) for p in ("a", "d") for s in ("chosen", "rejected")
    }


def _weights_row(pair_id: str, side: str, n: int, topk: int = 0) -> dict:
    row = {
        "pair_id": pair_id,
        "side": side,
        "text_digest": f"{pair_id}{side}",
        "token_ids": list(range(3, 3 + n)),
        "attribution": [0.1] * n,
        "prior": [1.0] * n,
        "weight": [1.0] * n,
        "reference_logp": [-1.5] * n,
    }
    if topk:
        row["reference_topk_ids"] = np.arange(n * topk, dtype=np.int32).reshape(n, topk)
        row["reference_topk_logp"] = -np.arange(n * topk, dtype=np.float32).reshape(n, topk) / 10
    return row


def test_reference_topk_cache_round_trip_and_absence_is_named(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    store.write_token_weights(
        con, "cached", [_weights_row("p1", "chosen", 3, topk=2), _weights_row("p1", "rejected", 2, topk=2)]
    )
    store.write_token_weights(con, "plain", [_weights_row("p1", "chosen", 3)])
    stored = store.read_token_weights(con, "cached", with_reference_topk=True)
    chosen = stored[("p1", "chosen")]
    assert chosen.reference_topk_ids.tolist() == [[0, 1], [2, 3], [4, 5]]
    np.testing.assert_allclose(chosen.reference_topk_logp, -np.arange(6, dtype=np.float32).reshape(3, 2) / 10)
    assert stored[("p1", "rejected")].reference_topk_ids.shape == (2, 2)
    assert (
        store.read_token_weights(con, "cached")[("p1", "chosen")].reference_topk_ids is None
    )  # not asked for
    with pytest.raises(
        ValueError, match="no reference top-k cache: materialize token_weights with reference_kl_top_k"
    ):
        store.read_token_weights(con, "plain", with_reference_topk=True)
    with pytest.raises(ValueError, match=r"must be two \[3, k\] arrays"):
        bad = _weights_row("p2", "chosen", 3, topk=2)
        store.write_token_weights(
            con, "cached", [{**bad, "reference_topk_logp": bad["reference_topk_logp"][:2]}]
        )


def test_a_token_weights_table_from_before_the_cache_gains_its_columns(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE token_weights (fingerprint VARCHAR NOT NULL, pair_id VARCHAR NOT NULL, side VARCHAR NOT NULL, "
        "text_digest VARCHAR NOT NULL, position INTEGER NOT NULL, token_id INTEGER NOT NULL, attribution FLOAT NOT NULL, "
        "prior FLOAT NOT NULL, weight FLOAT NOT NULL, reference_logp FLOAT NOT NULL, "
        "PRIMARY KEY (fingerprint, pair_id, side, position))"
    )
    con.execute("INSERT INTO token_weights VALUES ('old', 'p1', 'chosen', 'd', 0, 7, 0.1, 1.0, 1.0, -2.0)")
    con.close()
    con = store.connect(path)
    assert store.read_token_weights(con, "old")[("p1", "chosen")].token_ids.tolist() == [7]
    store.write_token_weights(con, "new", [_weights_row("p1", "chosen", 2, topk=3)])
    assert store.read_token_weights(con, "new", with_reference_topk=True)[
        ("p1", "chosen")
    ].reference_topk_ids.shape == (2, 3)


def test_reference_topk_from_the_attribution_pass_equals_a_plain_forward(tiny):
    from tidpo_core.method.kl import reference_topk

    pairs, tokenizer, model = tiny
    encoded = [encode_response(tokenizer, p.prompt, p.chosen, SETTINGS) for p in pairs[:4]]
    for enc, imp in zip(
        encoded, compute_token_importance(model, encoded, batch_size=2, reference_topk=5), strict=True
    ):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits
        ids, logp = reference_topk(logits, 5)
        mask = torch.tensor(enc.response_mask) == 1
        assert imp.reference_topk_ids.shape == (int(mask.sum()), 5)
        np.testing.assert_array_equal(imp.reference_topk_ids, ids[0][mask].numpy())
        np.testing.assert_allclose(imp.reference_topk_logp, logp[0][mask].numpy(), atol=1e-5)
    assert compute_token_importance(model, encoded[:1])[0].reference_topk_ids is None


def test_eval_pairs_stay_eval_pairs_when_data_is_added(tmp_path):
    con = store.connect(tmp_path / "t.duckdb")
    pairs = generate_synthetic_pairs(120, seed=3)
    store.replace_pairs(con, LoadResult(pairs[:80], [], 80), eval_fraction=0.25)
    before = [p.pair_id for p in store.read_pairs(con, split="eval")]
    store.record_evaluation_pairs(con, "run-1", before)
    store.replace_pairs(con, LoadResult(pairs, [], 120), eval_fraction=0.25)  # 40 new pairs arrive
    after = [p.pair_id for p in store.read_pairs(con, split="eval")]
    assert set(before) <= set(after) and len(after) > len(before)
    assert store.shared_evaluation_pairs(con, "run-1", after) == (len(before), len(after) - len(before))
    assert store.shared_evaluation_pairs(con, "no-such-run", after) == (0, len(after))
    con.close()
