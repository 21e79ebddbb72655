"""Multi-turn HH prompts are shown as their turns in the heatmap titles and the Dagster previews."""

from tidpo_core.evaluation.heatmaps import _prompt_title
from tidpo_core.evaluation.plots import HeatmapRow, HeatmapSection, token_heatmap_html
from tidpo_pipeline.metadata import anchors_preview, pairs_preview, prompt_cell

TWO_TURNS = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\nHuman: For how long?\n\nAssistant:"


def test_heatmap_title_of_a_two_turn_prompt_shows_its_turns() -> None:
    title = _prompt_title(TWO_TURNS)
    assert title == "user: How do I boil an egg?\nassistant: Put it in boiling water.\nuser: For how long?"
    assert "Human:" not in title and "Assistant:" not in title
    assert _prompt_title("What is 2 + 2?") == "user: What is 2 + 2?"


def test_heatmap_title_cuts_long_turns_and_keeps_the_last_turns() -> None:
    assert _prompt_title("\n\nHuman: " + "x" * 300 + "\n\nAssistant:", width=20) == "user: " + "x" * 19 + "…"
    long = (
        "".join(f"\n\nHuman: question {i}\n\nAssistant: answer {i}" for i in range(3))
        + "\n\nHuman: last?\n\nAssistant:"
    )
    title = _prompt_title(long, turns=3)
    assert title.split("\n") == [
        "… 4 earlier turns",
        "user: question 2",
        "assistant: answer 2",
        "user: last?",
    ]


def test_heatmap_html_draws_each_turn_on_its_own_line() -> None:
    section = HeatmapSection(
        _prompt_title(TWO_TURNS), [HeatmapRow("chosen", ["Five", " minutes"], [1.0, 0.5])]
    )
    html = token_heatmap_html([section])
    assert (
        "<h4>user: How do I boil an egg?<br>assistant: Put it in boiling water.<br>user: For how long?</h4>"
        in html
    )


def test_pairs_preview_shows_the_turns_in_one_cell() -> None:
    assert (
        prompt_cell(TWO_TURNS)
        == "user: How do I boil an egg? / assistant: Put it in boiling water. / user: For how long?"
    )
    # too long: the end is kept, where the turn the answers reply to is
    assert prompt_cell(TWO_TURNS, 25) == "…r. / user: For how long?"
    table = pairs_preview([("p1", "train", TWO_TURNS, "About seven minutes.", "Forever.")])
    assert "user: How do I boil an egg? / assistant: Put it in boiling water. / user: For how long?" in table
    assert "Human:" not in table and "⏎" not in table
    assert "user: For how long?" in anchors_preview([("p1", TWO_TURNS, "Seven minutes.")])
