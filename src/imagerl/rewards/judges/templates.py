"""Prompt texts of the VLM judges and the helper that turns them into OpenAI-style chat messages.

Every template is a ``str.format`` string; the placeholders it needs are listed next to it and checked
by `check_template` when a judge is built, so a user template with a typo fails at start. The wording is
ours. The VIEScore templates follow the structure of VIEScore (Ku et al., 2023, arXiv:2312.14867):
semantic consistency (SC) and perceptual quality (PQ) rated 0-10 and returned as
``{"reasoning": ..., "score": [...]}``, but they are shorter than the paper's prompts.
"""

from __future__ import annotations

import string
from typing import Any

# --- yes / no (placeholders: prompt) --------------------------------------------------------------
YES_NO = (
    'Does this image match the description "{prompt}"? '
    "Look at objects, counts, colours, positions and any written text. Answer with one word: yes or no."
)

# --- VIEScore (placeholders: prompt for t2i, instruction for editing) ------------------------------
VIESCORE_RULES = (
    "You are a strict evaluator of AI-generated images. Rate on a scale from 0 to 10 as instructed. "
    'Reply with JSON only, in this form: {{"reasoning": "<one or two sentences>", "score": [<numbers>]}}'
)
VIESCORE_SC_T2I = (
    VIESCORE_RULES + "\n\n"
    'Text prompt: "{prompt}"\n'
    "Give one score: how well the image follows the prompt (0 = not at all, 10 = every detail is right)."
)
VIESCORE_SC_EDIT = (
    VIESCORE_RULES + "\n\n"
    "The first image is the original; the second image is the result of the edit instruction below.\n"
    'Edit instruction: "{instruction}"\n'
    "Give two scores: (1) editing success: how well the second image carries out the instruction "
    "(0 = not done, 10 = fully done); (2) over-editing: how well everything the instruction did not ask "
    "to change is kept as in the original (0 = the image was changed beyond the instruction, 10 = only "
    "the requested change was made)."
)
VIESCORE_PQ = (
    VIESCORE_RULES + "\n\n"
    "Give two scores for the image: (1) naturalness: does it look like a plausible photo or artwork, with "
    "sensible lighting, shadows and proportions (0 = not at all, 10 = fully natural); (2) artifacts: "
    "distortions, blur, broken text, extra limbs, noise (0 = severe artifacts, 10 = none)."
)

# --- pairwise (placeholders: prompt) ---------------------------------------------------------------
PAIRWISE = (
    "Two images, Image A and Image B, were generated for the same prompt.\n"
    'Prompt: "{prompt}"\n'
    "Which image follows the prompt better (content, counts, colours, positions, text), and then has the "
    "better visual quality? Answer with a single letter, A or B. Answer tie only if they are equally good."
)

# --- rubric (placeholders: prompt, dimensions, example) --------------------------------------------
RUBRIC = (
    "You are a strict evaluator. The images are, in order: {image_roles}.\n"
    'Instruction or prompt: "{prompt}"\n'
    "Rate each dimension below from 0 (very poor) to 10 (perfect):\n{dimensions}\n"
    "Reply with JSON only, one number per dimension, for example: {example}"
)
# Default rubric: five consistency dimensions for instruction-guided editing (our choice of dimensions).
RUBRIC_DIMENSIONS: dict[str, str] = {
    "instruction_following": "the requested change is carried out completely and correctly",
    "subject_consistency": "people, animals and objects that should stay the same keep their identity and details",
    "background_consistency": "regions the instruction does not mention are unchanged",
    "style_consistency": "lighting, colour palette and style match the original unless asked otherwise",
    "visual_quality": "the result is free of artifacts, blur and implausible structure",
}

# --- edit judge (placeholders: instruction) --------------------------------------------------------
EDIT_INTRO = "The first image is the original; the second image is the result of this edit instruction: \"{instruction}\".\n"
EDIT_FOLLOW_SCORE = EDIT_INTRO + (
    "How completely and correctly does the second image carry out the instruction? "
    "Answer with a single integer from 0 (not at all) to 10 (perfectly)."
)
EDIT_PRESERVE_SCORE = EDIT_INTRO + (
    "Apart from the requested change, how well is the rest of the original preserved (identity, layout, "
    "background, colours)? Answer with a single integer from 0 (everything changed) to 10 (nothing else changed)."
)
EDIT_FOLLOW_YES_NO = EDIT_INTRO + "Does the second image carry out the instruction? Answer with one word: yes or no."
EDIT_PRESERVE_YES_NO = EDIT_INTRO + (
    "Apart from the requested change, is the rest of the original image preserved? Answer with one word: yes or no."
)


def template_fields(template: str) -> set[str]:
    """Placeholder names used by a ``str.format`` template."""
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def check_template(template: str, allowed: set[str], field: str) -> None:
    """Fail at build time on placeholders the judge does not fill (a typo would fail mid-training)."""
    try:
        used = template_fields(template)
    except ValueError as e:
        raise ValueError(f"{field}: not a valid format template ({e}); write literal braces as {{{{ and }}}}") from e
    bad = used - allowed
    if bad:
        raise ValueError(f"{field}: unknown placeholder(s) {sorted(bad)}; this judge fills {sorted(allowed)}")


def chat_messages(
    text: str,
    image_uris: list[str],
    *,
    system: str | None = None,
    labels: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One user turn: the images (each optionally preceded by a text label such as "Image A:"), then `text`."""
    content: list[dict[str, Any]] = []
    for k, uri in enumerate(image_uris):
        if labels is not None:
            content.append({"type": "text", "text": labels[k]})
        content.append({"type": "image_url", "image_url": {"url": uri}})
    content.append({"type": "text", "text": text})
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": content})
    return msgs
