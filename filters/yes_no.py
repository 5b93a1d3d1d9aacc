"""The one yes/no reader: how an answer to a yes/no question is read, by POPE's scorer, the grounding
verifier, the grounding eval and the VLM eval alike.

`answer_to_label` is POPE's official rule (evaluate.py of Li et al. 2023), kept literal so our scores
stay comparable with published ones: the first sentence (the text before the first '.'), commas
removed, split on single spaces; "no" when a word is exactly "No", "no" or "not", else "yes". So
"I don't see a dog here.", "There isn't a dog." and "None of the objects is a dog." read as "yes".

`opening_yes_no` is what the data itself promises: every yes/no answer we publish opens with the word
Yes or No, and the verifier requires that opening to agree with `answer_to_label`.
"""
from __future__ import annotations

import re
from typing import Literal

_OPENING = re.compile(r"\s*(yes|no)\b", re.IGNORECASE)  # "Not really" / "Nothing" open with neither
_BARE = re.compile(r"\s*(yes|no)[.!]?\s*", re.IGNORECASE)


def answer_to_label(answer: str) -> Literal["yes", "no"]:
    """POPE's rule: first sentence, commas removed, split on ' '; No / not / no anywhere -> "no".

    Deliberately literal, as in POPE's evaluate.py: "Not really" and "I don't know" count as "yes",
    and only a space separates words (its `text.split(' ')`).
    """
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def opening_yes_no(answer: str) -> Literal["yes", "no"] | None:
    """The answer's first word when it is Yes or No (any case), else None."""
    found = _OPENING.match(answer)
    return found.group(1).lower() if found else None


def is_bare_yes_no(answer: str) -> bool:
    """"Yes." / "No." and nothing else: a complete answer that names no object."""
    return _BARE.fullmatch(answer) is not None
