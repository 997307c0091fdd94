"""Training captions: the subject word becomes the domain token; a report of what the data's captions hold.

`--subject_words` (default: the preset's) lists the words that name the subject in raw captions
("dog", "puppy", "corgi", ...). Matching is case-insensitive, on whole words; a run of subject words
("Golden Retriever puppy", with "retriever" and "puppy" both subject words) counts as one and becomes
one token. A caption naming the subject only in the plural ("two dogs") is not rewritten: the encoder
binds one subject, and "two pet" would teach the token a wrong meaning; like a caption without any
subject word it gets the template in front, and the caption report counts it so the data can be fixed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from nested_attention.logs import LOG_PREFIX as PREFIX

# Irregular plurals of subject words; the rest take -s / -es / -ies (plural_forms).
IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "gentleman": "gentlemen",
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "goose": "geese",
    "wolf": "wolves",
    "calf": "calves",
    "fish": "fish",
    "sheep": "sheep",
}
# What CaptionRule.classify answers, in the order the caption report lists them.
CAPTION_KINDS = ("subject", "token", "template", "no_subject", "plural")


def plural_forms(word: str) -> set[str]:
    """The plural of an English noun, lower case: irregular ones from a table, else -s / -es / -ies."""
    word = word.lower()
    if word in IRREGULAR_PLURALS:
        return {IRREGULAR_PLURALS[word]}
    if re.search(r"(s|x|z|ch|sh)$", word):
        return {word + "es"}
    if re.search(r"[^aeiou]y$", word):
        return {word[:-1] + "ies"}
    return {word + "s"}


def words_pattern(words: Sequence[str]) -> re.Pattern:
    """Case-insensitive whole words; a run of them ("retriever puppy", "tabby-cat") matches as one."""
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})(?:[\s\-]+(?:{alternatives}))*\b", re.IGNORECASE)


@dataclass(frozen=True)
class CaptionRule:
    """How a raw caption becomes a training caption with the domain token in it (module docstring)."""

    token: str  # the domain token s*
    subject_words: tuple[str, ...]  # words that name the subject in raw captions
    template: str  # "{token}" is replaced by the token

    def classify(self, caption: str | None, subject: str | None = None) -> str:
        """One of CAPTION_KINDS: names the subject (a subject word, or the record's own `subject`),
        already has the token, is empty (the template), has no subject word, or has it only in the plural."""
        caption = (caption or "").strip()
        if not caption:
            return "template"
        words = [subject] if subject else list(self.subject_words)
        match = words_pattern(words).search(caption)
        if match:  # the token itself among the subject words ("a pet in the snow") is no rewrite
            return "token" if match.group(0).lower() == self.token.lower() else "subject"
        if words_pattern([self.token]).search(caption):
            return "token"
        if words_pattern([p for w in words for p in plural_forms(w)]).search(caption):
            return "plural"
        return "no_subject"

    def apply(self, caption: str | None, subject: str | None = None) -> str:
        """The training caption: the first run of subject words replaced by the token; the template for no
        caption; the template in front of a caption without the subject (or with it only in the plural)."""
        base = self.template.format(token=self.token)
        kind = self.classify(caption, subject)
        caption = (caption or "").strip()
        if kind == "template":
            return base
        if kind == "subject":
            words = [subject] if subject else list(self.subject_words)
            return words_pattern(words).sub(self.token, caption, count=1)
        if kind == "token":
            return caption
        return f"{base}, {caption}"


def caption_counts(rule: CaptionRule, records: Sequence) -> dict[str, list[str]]:
    """The keys of the records (data.Record) per caption kind (CAPTION_KINDS), in order."""
    found: dict[str, list[str]] = {kind: [] for kind in CAPTION_KINDS}
    for record in records:
        found[rule.classify(record.caption, record.subject)].append(record.key)
    return found


def caption_report(rule: CaptionRule, found: dict[str, list[str]], what: str, examples: int = 3) -> str:
    """One line counting captions by kind (`found`: caption_counts' answer), with example keys of those
    that need attention; `what` says which records ("12 records", "11 samples of the shards"). The data
    scan (training.data.scan) puts it in its summary: the one place the counts are reported."""
    base = rule.template.format(token=rule.token)
    said = {
        "subject": f"name the subject (rewritten to {rule.token!r})",
        "token": f"already use {rule.token!r}",
        "template": f"have no caption (the template {base!r} is used)",
        "no_subject": "have no subject word (the template is put in front; --subject_words sets the words)",
        "plural": "name the subject only in the plural (not rewritten; the template is put in front)",
    }
    parts = []
    for kind in CAPTION_KINDS:
        keys = found.get(kind, [])
        if keys:
            more = f" ... and {len(keys) - examples} more" if len(keys) > examples else ""
            e = f", e.g. {', '.join(keys[:examples])}{more}" if kind in ("no_subject", "plural") else ""
            parts.append(f"{len(keys)} {said[kind]}{e}")
    return f"{PREFIX} captions of {what}: " + ("; ".join(parts) or "none")
