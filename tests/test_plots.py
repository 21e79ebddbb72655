"""Heatmaps, curves and the comparison chart are written, non-empty, and show the right tokens."""

import re

import pytest

from tidpo_core.batching.features import EncodingSettings, encode_response
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.evaluation.heatmaps import importance_heatmap_sections
from tidpo_core.evaluation.plots import (
    HeatmapRow,
    HeatmapSection,
    png_markdown,
    save_comparison_png,
    save_token_heatmap_png,
    save_training_curves_png,
    token_display_text,
    token_heatmap_html,
)
from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer

ENCODING = EncodingSettings(max_prompt_tokens=64, max_response_tokens=96)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup():
    pairs = generate_synthetic_pairs(6, seed=3)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=400)
    model = build_tiny_model(
        tokenizer,
        TinyModelConfig(
            vocab_size=400,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
    )
    return pairs, tokenizer, model


def test_heatmap_files_match_the_tokenization(setup, tmp_path):
    pairs, tokenizer, model = setup
    chosen = pairs[:2]
    anchors = {chosen[0].pair_id: " Please call a doctor $5 now."}  # "$" must not start mathtext
    sections = importance_heatmap_sections(model, tokenizer, chosen, ENCODING, anchors=anchors)
    assert [len(s.rows) for s in sections] == [3, 2]
    html = token_heatmap_html(sections, caption="test")
    png = tmp_path / "heat.png"
    drawn = save_token_heatmap_png(sections, png, caption="test")
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5_000
    blocks = html.split('<div class="row">')[1:]
    expected_rows = []
    for pair in chosen:
        texts = [("chosen", pair.chosen), ("rejected", pair.rejected)]
        if pair.pair_id in anchors:
            texts.append(("anchor", anchors[pair.pair_id]))
        for side, text in texts:
            expected_rows.append(
                (side, encode_response(tokenizer, pair.prompt, text, ENCODING).response_length)
            )
    assert len(blocks) == len(expected_rows)
    for block, (side, length) in zip(blocks, expected_rows, strict=True):
        assert block.startswith(f"<strong>{side}</strong>")
        assert len(re.findall(r'<span class="tok"', block)) == length
    assert drawn["chosen"] == sum(n for s, n in expected_rows if s == "chosen")
    assert drawn["anchor"] == sum(n for s, n in expected_rows if s == "anchor")
    # the critical span is outlined: exactly the span's tokens in the chosen row of the first pair
    first = sections[0].rows[0]
    assert first.span and html.count("outline:") == sum(len(r.span) for s in sections for r in s.rows)
    assert "Please" in "".join(sections[0].rows[2].tokens)


def test_token_display_text_cuts_by_offsets():
    assert token_display_text("ab cd", [(0, 2), (2, 5), (5, 5)]) == ["ab", " cd", "⟨eos⟩"]
    with pytest.raises(ValueError):
        HeatmapRow("x", ["a", "b"], [1.0])


def test_curves_and_comparison_charts(tmp_path):
    series = {
        "tidpo": {
            "loss": [(1, 0.7), (2, 0.6), (3, 0.5)],
            "rewards/accuracies": [(1, 0.5), (2, 0.75), (3, 1.0)],
        },
        "dpo": {"loss": [(1, 0.7), (2, 0.65)], "rewards/margins": []},
    }
    curves = save_training_curves_png(series, tmp_path / "curves.png")
    assert curves.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        save_training_curves_png({"x": {"loss": []}}, tmp_path / "none.png")
    table = [
        {"method": "dpo", "seeds": 3, "reward_accuracy_mean": 0.6, "reward_accuracy_std": 0.05},
        {"method": "tidpo", "seeds": 1, "reward_accuracy_mean": 0.7, "reward_accuracy_std": float("nan")},
    ]
    chart = save_comparison_png(table, ["reward_accuracy", "absent_metric"], tmp_path / "cmp.png")
    assert chart.stat().st_size > 2_000
    markdown = png_markdown(chart, "cmp")
    assert markdown.startswith("![cmp](data:image/png;base64,iVBOR")


def test_empty_sections_still_draw(tmp_path):
    drawn = save_token_heatmap_png([HeatmapSection("only a title", [])], tmp_path / "empty.png")
    assert drawn == {} and (tmp_path / "empty.png").stat().st_size > 0


def test_heatmap_puts_another_estimator_beside_the_papers_weights(setup):
    from tidpo_core.evaluation.heatmaps import best_importance_estimator
    from tidpo_core.method.importance import compute_token_importance

    pairs, tokenizer, model = setup
    sections = importance_heatmap_sections(
        model, tokenizer, pairs[:1], ENCODING, compare_with="surprisal_no_eos"
    )
    rows = sections[0].rows
    assert [r.label for r in rows] == [
        "chosen",
        "chosen: surprisal_no_eos",
        "rejected",
        "rejected: surprisal_no_eos",
    ]
    assert rows[0].tokens == rows[1].tokens and rows[0].span == rows[1].span and rows[0].span
    encoded = encode_response(tokenizer, pairs[0].prompt, pairs[0].chosen, ENCODING)
    expected = compute_token_importance(
        model, [encoded], estimator="surprisal", exclude_eos=True, eos_token_id=tokenizer.eos_token_id
    )
    assert rows[1].weights == pytest.approx([float(w) for w in expected[0].weight])
    metrics = {
        "precision_at_k_hybrid_attribution": 0.9,
        "precision_at_k_hybrid_surprisal": 0.3,
        "precision_at_k_hybrid_surprisal_no_eos": 0.4,
    }
    assert best_importance_estimator(metrics) == "surprisal_no_eos"
    assert best_importance_estimator({"precision_at_k_hybrid": 0.5}) is None
