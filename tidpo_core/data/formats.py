"""Recognising a row's format and turning it into (prompt, chosen, rejected) texts.

Formats are detected per row, so mixed files work:

* explicit: ``prompt``, ``chosen``, ``rejected`` strings;
* TRL conversational: ``chosen``/``rejected`` (and optionally ``prompt``) as lists of
  ``{"role", "content"}`` messages, with an explicit or an implicit (shared-prefix) prompt;
* Anthropic HH: ``chosen``/``rejected`` full transcripts and no ``prompt``.

A row that fits none of them, or fits one badly, gives a :class:`Rejection` instead of texts; judging
the texts themselves (length, emptiness, duplicates) is tidpo_core.data.validation's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tidpo_core.data.pairs import DataRowError, QuarantineReason

__all__ = [
    "HH_ASSISTANT",
    "ChatTemplate",
    "Rejection",
    "chat_template_renderer",
    "parse_row",
    "split_hh_dialogue",
]

ChatTemplate = Callable[[list[dict]], str]

HH_ASSISTANT = "\n\nAssistant:"
_ROLE_LABELS = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}


def split_hh_dialogue(chosen_transcript: str, rejected_transcript: str) -> tuple[str, str, str]:
    """Split two Anthropic HH transcripts into (prompt, chosen, rejected).

    The prompt runs up to and including the last "\n\nAssistant:" of the chosen transcript, so
    ``prompt + chosen == chosen_transcript``. The rejected transcript must reach its own last
    Assistant turn through exactly the same text; when it does not (HH has a few transcripts with a
    stray turn glued into a response), the split is ambiguous and a ValueError says so rather than
    guessing.
    """
    cut = chosen_transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("chosen transcript has no '\\n\\nAssistant:' turn")
    rcut = rejected_transcript.rfind(HH_ASSISTANT)
    if rcut < 0:
        raise ValueError("rejected transcript has no '\\n\\nAssistant:' turn")
    prompt = chosen_transcript[: cut + len(HH_ASSISTANT)]
    if rejected_transcript[: rcut + len(HH_ASSISTANT)] != prompt:
        raise ValueError("chosen and rejected transcripts differ before their last '\\n\\nAssistant:' turn")
    return prompt, chosen_transcript[len(prompt) :], rejected_transcript[len(prompt) :]


def chat_template_renderer(tokenizer: Any) -> ChatTemplate | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Rejection:
    """Why a row is quarantined: the reason and a detail naming the field at fault."""

    reason: QuarantineReason
    detail: str


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    # Multimodal-style content: a list of {"type": "text", "text": ...} parts.
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _normalize_messages(name: str, messages: list[Any]) -> list[dict[str, str]] | Rejection:
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or "content" not in msg:
            return Rejection(
                QuarantineReason.UNRECOGNIZED_FORMAT,
                f"{name}[{i}] is not a {{'role', 'content'}} message",
            )
        text = _message_text(msg["content"])
        if text is None:
            return Rejection(
                QuarantineReason.NOT_TEXT,
                f"{name}[{i}].content is {type(msg['content']).__name__}, expected str",
            )
        out.append({"role": msg["role"], "content": text})
    return out


def _render_plain(messages: list[dict[str, str]]) -> str:
    turns = "".join(
        f"\n\n{_ROLE_LABELS.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages
    )
    return turns + HH_ASSISTANT


def _completion_text(name: str, messages: list[dict[str, str]]) -> str | Rejection:
    if not messages:
        return Rejection(QuarantineReason.MISSING_FIELD, f"{name} has no assistant message after the prompt")
    roles = sorted({m["role"] for m in messages} - {"assistant"})
    if roles:
        return Rejection(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            f"{name} response contains non-assistant messages ({', '.join(roles)}): "
            "the conversations diverge before the last assistant turn",
        )
    return "\n\n".join(m["content"] for m in messages)


def _shared_prefix_len(a: list[dict[str, str]], b: list[dict[str, str]]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    # The prompt ends at a non-assistant turn; a shared assistant turn belongs to the responses.
    while k > 0 and a[k - 1]["role"] == "assistant":
        k -= 1
    return k


def _parse_conversational(
    prompt: Any, chosen: list[Any], rejected: list[Any], chat_template: ChatTemplate | None
) -> tuple[str, str, str] | Rejection:
    c_msgs = _normalize_messages("chosen", chosen)
    if isinstance(c_msgs, Rejection):
        return c_msgs
    r_msgs = _normalize_messages("rejected", rejected)
    if isinstance(r_msgs, Rejection):
        return r_msgs

    if isinstance(prompt, list):
        p_msgs = _normalize_messages("prompt", prompt)
        if isinstance(p_msgs, Rejection):
            return p_msgs
        # Some datasets repeat the prompt inside chosen/rejected; strip it so only the reply remains.
        if c_msgs[: len(p_msgs)] == p_msgs:
            c_msgs = c_msgs[len(p_msgs) :]
        if r_msgs[: len(p_msgs)] == p_msgs:
            r_msgs = r_msgs[len(p_msgs) :]
    else:
        k = _shared_prefix_len(c_msgs, r_msgs)
        if k:
            p_msgs, c_msgs, r_msgs = c_msgs[:k], c_msgs[k:], r_msgs[k:]
        elif isinstance(prompt, str):
            # Completion-only conversations with a plain-text prompt (e.g. UltraFeedback variants).
            p_msgs = [{"role": "user", "content": prompt}]
        else:
            return Rejection(
                QuarantineReason.MISSING_FIELD,
                "prompt: no 'prompt' key and chosen/rejected share no leading messages",
            )
    if not p_msgs:
        return Rejection(QuarantineReason.EMPTY_TEXT, "prompt has no messages")

    chosen_text = _completion_text("chosen", c_msgs)
    if isinstance(chosen_text, Rejection):
        return chosen_text
    rejected_text = _completion_text("rejected", r_msgs)
    if isinstance(rejected_text, Rejection):
        return rejected_text

    if chat_template is None:
        return _render_plain(p_msgs), " " + chosen_text, " " + rejected_text
    try:
        prompt_text = chat_template(p_msgs)
    except Exception as exc:  # templates raise anything (jinja errors, role-order checks)
        return Rejection(QuarantineReason.UNRECOGNIZED_FORMAT, f"chat template failed: {exc}")
    if not isinstance(prompt_text, str):
        return Rejection(QuarantineReason.NOT_TEXT, "chat template did not return a string")
    return prompt_text, chosen_text, rejected_text


def parse_row(raw: Any, chat_template: ChatTemplate | None) -> tuple[str, str, str] | Rejection:
    """One raw row as (prompt, chosen, rejected) texts, or the Rejection that quarantines it."""
    if isinstance(raw, DataRowError):
        return Rejection(QuarantineReason.MALFORMED, raw.detail)
    if isinstance(raw, bytes | bytearray | str):
        return Rejection(QuarantineReason.MALFORMED, "row could not be decoded as a JSON object")
    if not isinstance(raw, Mapping):
        return Rejection(QuarantineReason.MALFORMED, f"row is a JSON {type(raw).__name__}, not an object")

    # None means "absent": datasets/parquet fill missing keys of mixed-schema files with nulls.
    prompt, chosen, rejected = raw.get("prompt"), raw.get("chosen"), raw.get("rejected")
    if chosen is None and rejected is None:
        if prompt is None:
            keys = ", ".join(sorted(map(str, raw.keys()))[:10]) or "none"
            return Rejection(
                QuarantineReason.UNRECOGNIZED_FORMAT,
                f"no prompt/chosen/rejected fields (keys: {keys})",
            )
        return Rejection(QuarantineReason.MISSING_FIELD, "chosen and rejected are missing")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            return Rejection(QuarantineReason.MISSING_FIELD, f"{name} is missing")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is not None and not isinstance(value, str | list):
            return Rejection(
                QuarantineReason.NOT_TEXT,
                f"{name} is {type(value).__name__}, expected str or list of messages",
            )

    if isinstance(chosen, list) and isinstance(rejected, list):
        return _parse_conversational(prompt, chosen, rejected, chat_template)
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return Rejection(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            "one of chosen/rejected is text and the other a message list",
        )
    if isinstance(prompt, str):
        return prompt, chosen, rejected
    if isinstance(prompt, list):
        return Rejection(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            "prompt is a message list but chosen/rejected are plain text",
        )
    has_turn = (HH_ASSISTANT in chosen, HH_ASSISTANT in rejected)
    if all(has_turn):
        try:
            return split_hh_dialogue(chosen, rejected)
        except ValueError as exc:
            return Rejection(QuarantineReason.UNRECOGNIZED_FORMAT, f"HH transcript: {exc}")
    if any(has_turn):
        return Rejection(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            "only one of chosen/rejected is an HH transcript with an Assistant turn",
        )
    return Rejection(
        QuarantineReason.MISSING_FIELD,
        "prompt is missing and chosen/rejected are not HH transcripts",
    )
