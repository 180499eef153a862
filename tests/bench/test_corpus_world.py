"""The world: vocabulary from installed data, attribute validation, pure renders."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.bench import world
from fewstep.bench.corpus import phrasing, sample


def test_vocabulary_is_small_and_installed():
    table = world.emoji_table()
    for category, subjects in world.SUBJECTS.items():
        assert 16 <= len(subjects) <= 30, category
        for sub in subjects:
            assert sub.cldr in table, sub.cldr
    groups = {table[s.cldr]["group"] for s in world.PORTRAIT}
    assert groups == {"Smileys & Emotion", "People & Body"}
    assert len(world.IDENTITY_SUBJECTS) >= 8 and len(world.GENDER_SUBJECTS) >= 8
    for key in world.IDENTITY_SUBJECTS:
        for tone in world.SKIN_TONES:
            assert world.emoji_of(key, tone) != world.emoji_of(key)
    for font in world.FONTS:
        assert world.font_path(font).exists()
    assert 30 <= len(world.WORDS) <= 50 and all(3 <= len(w) <= 6 for w in world.WORDS)


def test_make_attrs_names_the_bad_field():
    with pytest.raises(ValueError, match="background"):
        world.make_attrs("portrait", subject="man", background="beige")
    with pytest.raises(ValueError, match="subject"):
        world.make_attrs("landscape", subject="man", background="red")
    with pytest.raises(ValueError, match="skin_tone"):
        world.make_attrs("portrait", subject="grinning_face", background="red", skin_tone="dark")
    with pytest.raises(ValueError, match="position"):
        world.make_attrs("text", text="SUN", font="serif", text_color="red", background="white", position="left")


def test_renders_are_pure_and_attributes_visible():
    attrs = world.make_attrs("landscape", subject="volcano", background="teal", position="left", size="small")
    a, b = world.render_t2i(attrs, 64), world.render_t2i(dict(attrs), 64)
    assert a.size == (64, 64) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    pixels = np.asarray(a)
    assert tuple(pixels[2, 62]) == world.COLORS["teal"]  # far corner is background
    box = world.layout(attrs, 64)["subject"][0]
    assert box[2] < 0.5  # small on the left stays in the left half
    assert not (pixels[:, 40:] != world.COLORS["teal"]).any()
    right = world.render_t2i({**attrs, "position": "right"}, 64)
    assert right.tobytes() != a.tobytes()
    assert world.render_t2i(attrs, 128).size == (128, 128)


def test_text_word_changes_keep_the_lettering_size():
    base = dict(font="serif", text_color="black", background="white", position="center", size="large")
    short = world._fit_text("SUN", "serif", "large", 64)[0]
    long = world._fit_text("HOTEL", "serif", "large", 64)[0]
    assert short == long
    assert world.render_t2i(world.make_attrs("text", text="SUN", **base), 64).getbbox()


@pytest.mark.parametrize("category", world.EDIT_CATEGORIES)
def test_edit_metas_render_a_real_change(category):
    rng = np.random.default_rng(0)
    for _ in range(12):
        meta, instruction = sample.draw_edit(category, rng, 64)
        src, tgt = world.render_edit_pair(meta, 64)
        assert src.tobytes() != tgt.tobytes(), instruction
        assert instruction in phrasing.edit_instructions(meta)
        if category in ("object", "text", "identity"):
            assert meta["region"] is not None
            x0, y0, x1, y1 = meta["region"]
            diff = np.abs(np.asarray(src, dtype=int) - np.asarray(tgt, dtype=int)).sum(axis=2) > 0
            ys, xs = np.nonzero(diff)
            # The change stays inside the stated region (one pixel of resampling slack).
            assert xs.min() >= x0 * 64 - 2 and xs.max() <= x1 * 64 + 2, instruction
            assert ys.min() >= y0 * 64 - 2 and ys.max() <= y1 * 64 + 2, instruction


def test_hold_out_rule_is_about_ten_percent_and_stable():
    keys = [("t2i", "portrait", s.key, None, bg, "center", "large", 1, None, None, None)
            for s in world.PORTRAIT for bg in world.BACKGROUNDS]
    share = sum(map(world.is_reserved, keys)) / len(keys)
    assert 0.03 < share < 0.2
    assert [world.is_reserved(k) for k in keys] == [world.is_reserved(k) for k in keys]


def test_missing_data_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(world, "FONT_ROOT", tmp_path)
    with pytest.raises(world.WorldDataMissing, match="fonts-liberation"):
        world.font_path("serif")
    monkeypatch.setattr(world, "EMOJI_TEST", tmp_path / "none.txt")
    world.emoji_table.cache_clear()
    try:
        with pytest.raises(world.WorldDataMissing, match="unicode-data"):
            world.emoji_table()
    finally:
        monkeypatch.undo()
        world.emoji_table.cache_clear()
