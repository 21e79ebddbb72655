"""IFEval scoring with lm-eval's instruction checkers, strict and loose, offline: a checker that needs
data which cannot be had offline (nltk's punkt tokenizers) is reported with the reason and left out."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Mapping
from typing import Any


def ifeval_dependencies() -> str | None:
    """None when lm-eval's IFEval checkers import, else why not."""
    missing = []
    for module in ("langdetect", "immutabledict", "nltk"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"IFEval's checkers need {', '.join(missing)} (pip install 'lm_eval[ifeval]')"
    return None


def _ifeval_registry() -> Any:
    """lm-eval's instruction registry, imported without its attempt to download nltk data."""
    import nltk

    original = nltk.download
    nltk.download = lambda *args, **kwargs: False  # offline: never fetch at import time
    try:
        # lm-eval prints "Downloaded punkt_tab" even when the download did not happen: keep that quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_registry
    finally:
        nltk.download = original
    return instructions_registry


class IFEvalScorer:
    """lm-eval's strict and loose IFEval scoring, one instruction at a time.

    An instruction whose checker raises LookupError (nltk data such as punkt_tab that cannot be had
    offline) is recorded in `unavailable` with the reason and left out, instead of failing the prompt.
    """

    def __init__(self) -> None:
        self.registry = _ifeval_registry().INSTRUCTION_DICT
        self.unavailable: dict[str, str] = {}
        self.unchecked_instructions = 0
        self.prompts_excluded = 0

    def _checker(self, instruction_id: str, kwargs: Mapping[str, Any], prompt: str) -> Any:
        instruction = self.registry[instruction_id](instruction_id)
        instruction.build_description(**{k: v for k, v in kwargs.items() if v is not None})
        args = instruction.get_instruction_args()
        if args and "prompt" in args:
            instruction.build_description(prompt=prompt)
        return instruction

    @staticmethod
    def _loose_variants(response: str) -> list[str]:
        lines = response.split("\n")
        first, last, both = (
            "\n".join(lines[1:]).strip(),
            "\n".join(lines[:-1]).strip(),
            "\n".join(lines[1:-1]).strip(),
        )
        variants = [response, response.replace("*", ""), first, last, both]
        return variants + [first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]

    def score(self, doc: Mapping[str, Any], response: str) -> dict[str, Any]:
        ids = list(doc["instruction_id_list"])
        all_kwargs = json.loads(doc["kwargs_json"]) if "kwargs_json" in doc else list(doc["kwargs"])
        strict: list[bool] = []
        loose: list[bool] = []
        skipped = 0
        for instruction_id, kwargs in zip(ids, all_kwargs, strict=True):
            if instruction_id in self.unavailable:
                skipped += 1
                continue
            if instruction_id not in self.registry:
                self.unavailable[instruction_id] = "unknown instruction id for lm-eval's IFEval registry"
                skipped += 1
                continue
            checker = self._checker(instruction_id, kwargs or {}, doc["prompt"])
            try:
                strict_ok = bool(response.strip() and checker.check_following(response))
                loose_ok = any(
                    r.strip() and checker.check_following(r) for r in self._loose_variants(response)
                )
            except LookupError as exc:  # nltk data missing offline
                self.unavailable[instruction_id] = _lookup_reason(exc)
                skipped += 1
                continue
            strict.append(strict_ok)
            loose.append(loose_ok)
        self.unchecked_instructions += skipped
        if skipped:
            self.prompts_excluded += 1
        judged = skipped == 0 and bool(ids)
        return {
            "prompt_level_strict_acc": all(strict) if judged else None,
            "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose) if judged else None,
            "inst_level_loose_acc": loose,
        }


def _lookup_reason(exc: LookupError) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"Resource\s+(\S+)\s+not found", text)
    resource = match.group(1).strip("'\"") if match else "data"
    return (
        f"checker needs nltk resource '{resource}', which is not installed and cannot be downloaded offline"
    )
