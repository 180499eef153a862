"""Category rubrics and sub-score keys, modelled on the paper's judge prompts.

One source for both judges: the VLM judge sends these texts; the offline judge fills the same
sub-score keys from measurements. Every edit category has three criteria in the same roles:
``instruction`` (the edit asked for was done), ``preservation`` (what should not change did
not), ``quality`` (artefacts, noise, blur). The key names are category-specific, as in the
paper's rubric, so tables read naturally.
"""

from __future__ import annotations

from dataclasses import dataclass

T2I_CATEGORIES = ("portrait", "landscape", "text")
EDIT_CATEGORIES = ("scene", "enhancement", "object", "text", "identity", "style")

SCALE = """Score on an integer scale from 1 to 5:
5 = fully satisfies the request with no visible flaw;
4 = satisfies the request with minor flaws;
3 = partly satisfies it, or satisfies it with clear quality problems;
2 = mostly fails the request (wrong main subject, wrong text, or the edit not done) although parts are right;
1 = unrelated to the request, or unusable (noise, flat colour, broken image).
A failed core instruction caps the score at 2 whatever the image quality."""

T2I_RUBRICS: dict[str, str] = {
    "portrait": (
        "The prompt asks for a portrait-style picture of one main subject with stated attributes "
        "(the subject itself, the background colour, its position and size). Judge whether the "
        "right subject is clearly there, whether each stated attribute holds, and the image quality "
        "(clean flat areas, no residual noise, no smearing)."
    ),
    "landscape": (
        "The prompt asks for a scene with stated elements and attributes (the main element, sky or "
        "background colour, their layout). Judge whether the stated elements are there, whether each "
        "attribute holds, and the image quality (clean flat areas, no residual noise, no smearing)."
    ),
    "text": (
        "The prompt asks for an image showing an exact word or short text with stated attributes "
        "(text colour, background colour). The text must be legible and spelled exactly; a wrong or "
        "illegible word fails the core instruction. Also judge the attributes and image quality."
    ),
}


@dataclass(frozen=True)
class EditCriteria:
    instruction: str
    preservation: str
    quality: str
    rubric: str

    @property
    def keys(self) -> tuple[str, str, str]:
        return (self.instruction, self.preservation, self.quality)


EDIT_CRITERIA: dict[str, EditCriteria] = {
    "scene": EditCriteria(
        "scene_transformation", "subject_preservation", "visual_quality",
        "Scene transformation: the background or setting must change as instructed while the main "
        "subject stays the same (identity, position, size)."),
    "enhancement": EditCriteria(
        "enhancement_effect", "content_fidelity", "visual_quality",
        "Perceptual enhancement: the image must become cleaner/sharper as instructed (noise or blur "
        "removed) with the content unchanged."),
    "object": EditCriteria(
        "instruction_compliance", "unedited_region_preservation", "visual_quality",
        "Object manipulation: the object must be added, removed, replaced, moved or resized exactly as "
        "instructed; everything else must stay as in the source."),
    "text": EditCriteria(
        "text_accuracy", "unedited_region_preservation", "visual_quality",
        "Text editing: the text must read exactly as instructed (spelling and case) and keep the "
        "source's layout; nothing else may change."),
    "identity": EditCriteria(
        "instruction_compliance", "identity_preservation", "visual_quality",
        "Identity preservation: the requested change (an attribute of the subject or its setting) must be "
        "made while the subject stays recognisably the same one."),
    "style": EditCriteria(
        "style_fidelity", "content_preservation", "visual_quality",
        "Style transfer: the image must take the requested style while keeping its content and layout."),
}


def edit_keys(category: str) -> tuple[str, str, str]:
    if category not in EDIT_CRITERIA:
        raise ValueError(f"unknown edit category {category!r}; expected one of {', '.join(EDIT_CATEGORIES)}")
    return EDIT_CRITERIA[category].keys


def t2i_rubric(category: str) -> str:
    if category not in T2I_RUBRICS:
        raise ValueError(f"unknown T2I category {category!r}; expected one of {', '.join(T2I_CATEGORIES)}")
    return T2I_RUBRICS[category]


def t2i_system_prompt(category: str) -> str:
    return (
        "You are a strict image-generation judge. " + t2i_rubric(category) + "\n\n" + SCALE + "\n\n"
        'Answer with one JSON object and nothing else: {"score": <integer 1-5>, "reasoning": '
        '"<one sentence>"}'
    )


def edit_system_prompt(category: str) -> str:
    criteria = EDIT_CRITERIA[category] if category in EDIT_CRITERIA else None
    if criteria is None:
        edit_keys(category)  # raises the clear error
    assert criteria is not None
    sub = ", ".join(f'"{k}": <integer 1-5>' for k in criteria.keys)
    return (
        "You are a strict image-editing judge. The first image is the source, the second is the edited "
        "result. " + criteria.rubric + "\n\nGive a 1-5 sub-score for each criterion: "
        f"{criteria.instruction} (the instruction was carried out), {criteria.preservation} (what should "
        f"not change did not), {criteria.quality} (artefacts, noise, blur). The overall score is holistic.\n\n"
        + SCALE + "\n\nAnswer with one JSON object and nothing else: "
        '{"overall_score": <integer 1-5>, "sub_scores": {' + sub + '}, "reasoning": "<one sentence>", '
        '"failure_modes": [<short strings, empty if none>]}'
    )
