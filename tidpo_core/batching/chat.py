"""Conversations: a stored prompt read back as chat turns, and its rendering for a model with a chat template.

tidpo stores every prompt as one string in the Anthropic HH transcript form ("\\n\\nHuman: ...\\n\\nAssistant:"):
HH rows arrive that way, and TRL's conversational rows are written that way by `tidpo_core.data.formats`. A
plain `prompt` string (no turn labels) is one user turn. `prompt_messages` reads either back as
`[{"role", "content"}]` messages, so the turns survive to whichever model encodes them:

- a tokenizer with a chat template renders the messages with the template and its generation prompt,
  and each response ends with the template's end-of-turn token (`end_of_turn_id`);
- a tokenizer without one (the embedded tiny model) keeps the transcript text as it is.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = [
    "PROMPT_FORMAT",
    "ROLE_OF_LABEL",
    "closing_token_id",
    "end_of_turn_id",
    "has_chat_template",
    "prompt_messages",
    "readable_prompt",
    "render_prompt",
    "stop_token_ids",
]

PROMPT_FORMAT = "chat-template-1"
"""Version of how a chat model's prompts and responses are encoded (part of a chat reference's fingerprint)."""
# The labels `tidpo_core.data.formats` writes for each role, and HH's own two.
ROLE_OF_LABEL = {"Human": "user", "Assistant": "assistant", "System": "system"}
_TURN = re.compile(r"\n\n(Human|Assistant|System):")
_PROBE_CONTENT = "tidpo-probe-7f3a"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts for this tokenizer are rendered with a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The prompt's turns as chat messages.

    An HH transcript (it starts with a "\\n\\nHuman:" or "\\n\\nSystem:" turn) is split at its turn labels,
    and its closing, empty "\\n\\nAssistant:" (the slot the response fills) is dropped. Anything else is
    one user turn with the text stripped of surrounding whitespace.
    """
    stripped = prompt.rstrip()
    match = _TURN.match(prompt)
    if match is None or match.group(1) == "Assistant":
        return [{"role": "user", "content": prompt.strip()}]
    marks = list(_TURN.finditer(prompt))
    messages = []
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        end = following.start() if following is not None else len(prompt)
        messages.append({"role": ROLE_OF_LABEL[mark.group(1)], "content": prompt[mark.end() : end].strip()})
    if (
        messages[-1]["role"] == "assistant"
        and not messages[-1]["content"]
        and stripped.endswith("Assistant:")
    ):
        messages.pop()
    return messages


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model's chat template renders it, ending in the generation prompt."""
    return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>): the first token the template writes after an assistant
    message's content. Falls back to eos when the template writes no special token there."""
    return _end_of_turn_id(tokenizer, tokenizer.chat_template)


# Keyed by the tokenizer object and its template: the probe renders and tokenizes once per tokenizer.
@functools.lru_cache(maxsize=16)
def _end_of_turn_id(tokenizer: Any, template: str) -> int:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_CONTENT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    after = rendered[rendered.rindex(_PROBE_CONTENT) + len(_PROBE_CONTENT) :].lstrip(" ")
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template closes a turn with no special token and the tokenizer has no eos")
    return int(tokenizer.eos_token_id)


def closing_token_id(tokenizer: Any) -> int | None:
    """The token a response ends with: the chat template's end-of-turn token, or eos without a template."""
    return end_of_turn_id(tokenizer) if has_chat_template(tokenizer) else tokenizer.eos_token_id


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens sampling stops at: the closing token, and eos where it differs."""
    ids = [closing_token_id(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def readable_prompt(prompt: str, width: int = 0) -> str:
    """The prompt's turns one per line ("user: ..."), for previews and plot titles; `width` > 0 cuts each
    turn to that many characters."""
    lines = []
    for message in prompt_messages(prompt):
        content = " ".join(message["content"].split())
        if width and len(content) > width:
            content = content[: width - 1] + "…"
        lines.append(f"{message['role']}: {content}")
    return "\n".join(lines)
