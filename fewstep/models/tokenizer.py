"""Build a Qwen2-format tokenizer and VL processor locally (no download is possible here).

A byte-level BPE is trained with ``tokenizers`` on a deterministic built-in text (emoji names,
common English words, colours, positions and the Qwen-Image prompt templates) and wrapped as a
``Qwen2Tokenizer`` carrying the Qwen special tokens the prompt templates and the VL processor use.
Byte-level means every string is encodable; the vocabulary only decides how short sequences are.
Same arguments -> same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Special tokens in Qwen2.5-VL's order (their ids follow the BPE vocabulary here).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_COMMON_WORDS = """
a an the and or of in on at to with without from into onto over under above below behind beside
between near far left right top bottom center middle corner upper lower front back side inside outside
is are was be has have make change turn replace remove add put keep move swap restore fix enhance
brighten darken sharpen blur denoise colorize recolor style photo photograph picture image drawing
painting sketch cartoon watercolor pixel art oil pencil illustration portrait landscape scene text
word letter sign logo title caption font bold italic large small big tiny huge little tall short wide
narrow round square circle triangle star heart shape object person man woman boy girl child baby
face hair eyes smile skin tone light medium dark old young happy sad angry calm background foreground
sky sun moon cloud rain snow tree flower grass mountain river lake sea ocean beach desert forest
city street house road car bus train boat plane bird cat dog fish animal food fruit apple banana
red orange yellow green blue purple violet pink brown black white gray grey gold silver cyan magenta
teal navy olive maroon beige ivory lime indigo turquoise colour color colored bright pale vivid
one two three four five six seven eight nine ten many some all no not very more less same new
this that these those it its their his her my your our please show showing shows write writes
written says saying reads reading holding wearing standing sitting lying looking smiling
high quality detailed clean sharp noisy low resolution blurry ugly bad good best worst identity
same person original input output edit edited instruction keep everything else unchanged
"""

# Qwen2's pre-tokenizer split (the same regex Qwen2Tokenizer applies before byte-level BPE).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The template text is repeated so that each of its words becomes one BPE token. Then the system
# prompt tokenises into exactly as many tokens as the pipelines' drop index assumes (34 / 64, as
# with the real Qwen tokenizer), and the embeddings start at the user's prompt as they should.
_TEMPLATE_WEIGHT = 200


def training_text() -> list[str]:
    """The deterministic corpus the BPE is trained on: one string per entry."""
    import emoji

    from fewstep.models.templates import EDIT_TEMPLATE, T2I_TEMPLATE

    templates = []
    for template in (T2I_TEMPLATE, EDIT_TEMPLATE):
        plain = template.format("")
        for token in QWEN_SPECIAL_TOKENS:
            plain = plain.replace(token, "\n")
        templates.append(plain)
    lines = templates * _TEMPLATE_WEIGHT + [_COMMON_WORDS] * 20
    names = sorted({data["en"] for data in emoji.EMOJI_DATA.values()})
    for name in names:
        # ':man_climbing_medium-light_skin_tone:' -> 'man climbing medium-light skin tone'
        lines.append(re.sub(r"[_:]+", " ", name).strip())
    return lines


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 2048, model_max_length: int = 2048):
    """Train the byte-level BPE and return a ``Qwen2Tokenizer``; save it to ``out_dir`` if given."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    n_bpe = vocab_size - len(QWEN_SPECIAL_TOKENS)
    if n_bpe < 512:
        raise ValueError(f"vocab_size={vocab_size} is too small: use at least {512 + len(QWEN_SPECIAL_TOKENS)}")
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    base.train_from_iterator(training_text(), trainer=trainer)
    vocab = dict(sorted(base.get_vocab().items(), key=lambda kv: kv[1]))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(base.to_str())["model"]["merges"]]  # Qwen2Tokenizer wants tuples
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    # Special tokens in Qwen's order, so their ids are consecutive and deterministic.
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    check_template_alignment(tok)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def check_template_alignment(tokenizer) -> None:
    """Raise unless each template's system prefix is exactly its drop index long."""
    from fewstep.models.templates import EDIT_DROP, EDIT_TEMPLATE, T2I_DROP, T2I_TEMPLATE, template_prefix

    for name, template, drop in (("t2i", T2I_TEMPLATE, T2I_DROP), ("edit", EDIT_TEMPLATE, EDIT_DROP)):
        n = len(tokenizer(template_prefix(template)).input_ids)
        if n != drop:
            raise ValueError(
                f"the {name} template prefix tokenises into {n} tokens, but the pipeline drops {drop}: "
                "raise vocab_size so every template word is one token"
            )


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids the text encoder config must agree with."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id and t != "<|endoftext|>"]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen special tokens {missing}")
    return ids


class FewstepQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for images only: it has no video processor.

    transformers' ``Qwen2VLProcessor`` requires a video processor, which needs torchvision
    (unusable next to the CPU torch here). Leaving ``video_processor`` out of ``__init__`` makes
    transformers treat the processor as image + tokenizer only, for construction and
    ``from_pretrained`` alike. The saved files are the same as Qwen2VLProcessor's.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def make_processor(tokenizer, image_processor_config: dict | None = None) -> FewstepQwen2VLProcessor:
    """The VL processor over ``tokenizer`` with transformers' PIL image processor."""
    image_processor = Qwen2VLImageProcessorPil(**(image_processor_config or {}))
    return FewstepQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
