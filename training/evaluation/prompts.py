"""The evaluation prompts: clothing, expression, scene and style changes around the subject word.

A prompt is a template with `{token}` where the subject word goes. CLIP-T scores an image against the
prompt *without* the subject word (the paper's protocol), so that the score measures the rest of the
prompt and not how much the image looks like "a person" or "a pet".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = "{token}"


@dataclass(frozen=True)
class EvalPrompt:
    template: str  # the prompt with {token} where the subject word goes
    category: str = "custom"  # clothing / expression / scene / style, for the report

    def render(self, token: str) -> str:
        """The prompt the sampler gets: the subject word in place."""
        return self.template.replace(PLACEHOLDER, token)

    def without_subject(self) -> str:
        """The text CLIP-T compares with: the subject word removed, with the article in front of it."""
        text = re.sub(r"\b(?:a|an|the)\s+\{token\}", "", self.template, flags=re.IGNORECASE)
        text = text.replace(PLACEHOLDER, "")
        text = re.sub(r"\s+([,.;:!?])", r"\1", text)
        return re.sub(r"\s{2,}", " ", text).strip(" ,")


# In the spirit of the paper's evaluation prompts (section 5.2): changes of clothing, expression,
# scene and style, each keeping the subject word once.
DEFAULT_PROMPTS: tuple[EvalPrompt, ...] = (
    EvalPrompt("a photo of a {token} wearing a red hoodie", "clothing"),
    EvalPrompt("a {token} wearing a cowboy hat and sunglasses", "clothing"),
    EvalPrompt("a {token} dressed as an astronaut", "clothing"),
    EvalPrompt("a photo of a {token} laughing", "expression"),
    EvalPrompt("a close-up photo of a {token} looking surprised", "expression"),
    EvalPrompt("a photo of a sleepy {token} yawning", "expression"),
    EvalPrompt("a {token} on the beach at sunset", "scene"),
    EvalPrompt("a {token} in a snowy forest", "scene"),
    EvalPrompt("a {token} in front of the Eiffel Tower", "scene"),
    EvalPrompt("an oil painting of a {token}", "style"),
    EvalPrompt("a pencil sketch of a {token}", "style"),
    EvalPrompt("a pop art portrait of a {token}", "style"),
)

# The tiny test bed's set: two prompts keep the CPU run short.
TINY_PROMPTS: tuple[EvalPrompt, ...] = (
    EvalPrompt("a {token} wearing a red hoodie", "clothing"),
    EvalPrompt("an oil painting of a {token}", "style"),
)


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the line."""


def load_prompts(path: str | Path, token: str) -> list[EvalPrompt]:
    """Prompts from a text file: one per line, `{token}` (or the subject word itself) where the subject goes.

    Blank lines and lines starting with '#' are skipped. A line may start with a category and a colon
    and a space ("scene: a {token} on the moon"); the category must be one word.
    """
    prompts = []
    word = re.compile(rf"\b{re.escape(token)}\b", re.IGNORECASE)
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        category = "custom"
        head = re.match(r"^(\w+):\s+(.*)$", line)
        if head and PLACEHOLDER not in head.group(1):
            category, line = head.group(1), head.group(2)
        if PLACEHOLDER not in line:
            if not word.search(line):
                raise PromptFileError(
                    f"{path}, line {number}: {line!r} has neither {PLACEHOLDER} nor the subject word "
                    f"{token!r}. Every evaluation prompt must name the subject once, e.g. 'a {{token}} on "
                    "the beach'."
                )
            line = word.sub(PLACEHOLDER, line)
        prompts.append(EvalPrompt(line, category))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts (one per line, with {PLACEHOLDER}).")
    return prompts


def describe(prompts: Sequence[EvalPrompt]) -> list[dict]:
    return [
        {"template": p.template, "category": p.category, "clip_t_text": p.without_subject()} for p in prompts
    ]
