"""Prompts and edit instructions: natural phrasings of structured attributes.

Every phrasing of a T2I prompt states every field of ``world.combo_key`` and every
phrasing of an edit instruction states every field of ``world.edit_key``. That is what
makes held-out bench combinations also held-out prompts: two records whose keys differ
can never share an exact prompt.
"""

from __future__ import annotations

from fewstep.bench import world

_POS = {"center": "in the center", "left": "on the left", "right": "on the right",
        "top": "at the top", "bottom": "at the bottom"}
_POS_FRAME = {"center": "in the middle", "left": "on the left side", "right": "on the right side",
              "top": "near the top", "bottom": "near the bottom"}
_REL = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
_TONE = {None: "yellow", **{t: t for t in world.SKIN_TONES}}


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def noun(attrs: dict, *, definite: bool = False, with_size: bool = False) -> str:
    """``a large cat`` / ``two small cats`` / ``the man with dark skin``."""
    sub = world.subject(attrs["subject"])
    two = int(attrs.get("count", 1)) == 2
    word = sub.plural if two else sub.name
    if attrs.get("skin_tone"):
        word += f" with {attrs['skin_tone']} skin"
    if with_size:
        word = f"{attrs['size']} {word}"
    if two:
        return f"the two {word}" if definite else f"two {word}"
    return f"the {word}" if definite else _a(word)


def t2i_templates(category: str) -> int:
    return len(_TEXT_TEMPLATES) if category == "text" else len(_EMOJI_TEMPLATES)


_EMOJI_TEMPLATES = (
    lambda n, bg, p, pf: f"{n} on {_a(bg)} background, {p}",
    lambda n, bg, p, pf: f"{n} {pf}, plain {bg} background",
    lambda n, bg, p, pf: f"{bg} background with {n} {p}",
    lambda n, bg, p, pf: f"emoji art of {n} {p}, against a flat {bg} backdrop",
    lambda n, bg, p, pf: f"{n} {pf} of the picture, solid {bg} all around",
)
_TEXT_TEMPLATES = (
    lambda t, s, c, f, bg, p, pf: f'the word "{t}" in {s} {c} {f} letters on {_a(bg)} background, {p}',
    lambda t, s, c, f, bg, p, pf: f'{_a(bg)} sign that says "{t}" in {s} {c} {f} letters {p}',
    lambda t, s, c, f, bg, p, pf: f'"{t}" written in {s} {c} {f} type {pf}, {bg} background',
    lambda t, s, c, f, bg, p, pf: f'a poster with the text "{t}" in {s} {c} {f} lettering, {p}, on {bg}',
)


def t2i_prompt(attrs: dict, template: int) -> str:
    """The prompt for scene ``attrs`` in phrasing number ``template`` (any int; wraps)."""
    bg, pos = attrs["background"], attrs["position"]
    if attrs["category"] == "text":
        fn = _TEXT_TEMPLATES[template % len(_TEXT_TEMPLATES)]
        return fn(attrs["text"], attrs["size"], attrs["text_color"], world.FONTS[attrs["font"]][0],
                  bg, _POS[pos], _POS_FRAME[pos])
    fn = _EMOJI_TEMPLATES[template % len(_EMOJI_TEMPLATES)]
    return fn(noun(attrs, with_size=True), bg, _POS[pos], _POS_FRAME[pos])


# ---------------------------------------------------------------------------
# Edit instructions: one tuple of phrasings per operation
# ---------------------------------------------------------------------------


def _scene(m, s, t):
    n, sb, tb = noun(s, definite=True), s["background"], t["background"]
    return (f"change the {sb} background behind {n} to {tb}",
            f"replace the {sb} background with a {tb} one and keep {n} as it is",
            f"put {n} on a {tb} background instead of the {sb} one")


def _enhance(m, s, t):
    n, bg = noun(s), s["background"]
    return {
        "deblur": (f"restore this blurry photo of {n} on {_a(bg)} background",
                   f"sharpen the blurred picture of {n} on {bg}",
                   f"make this out-of-focus image of {n} on {_a(bg)} background crisp again"),
        "denoise": (f"remove the noise from this picture of {n} on {_a(bg)} background",
                    f"clean up the grainy photo of {n} on {bg}",
                    f"denoise this image of {n} on {_a(bg)} background"),
        "upscale": (f"restore the low-resolution image of {n} on {_a(bg)} background",
                    f"increase the resolution of this picture of {n} on {bg}",
                    f"upscale this low-res photo of {n} on {_a(bg)} background and make it sharp"),
    }[m["operation"]]


def _object(m, s, t):
    n, op = noun(s, definite=True), m["operation"]
    a, b = s.get("companion"), t.get("companion")
    if op == "add":
        c, rel = world.subject(b["subject"]).name, _REL[b["position"]]
        return (f"add {_a(c)} {rel} {n}", f"put {_a(c)} {rel} {n}",
                f"place a small {c} {rel} {n}")
    ca, rel = world.subject(a["subject"]).name, _REL[a["position"]]
    if op == "remove":
        return (f"remove the {ca} {rel} {n}", f"take away the {ca} {rel} {n}",
                f"erase the {ca} {rel} {n} and leave the background")
    cb = world.subject(b["subject"]).name
    return (f"replace the {ca} {rel} {n} with {_a(cb)}", f"swap the {ca} {rel} {n} for {_a(cb)}",
            f"turn the {ca} {rel} {n} into {_a(cb)}")


def _text(m, s, t):
    a, b = s["text"], t["text"]
    return (f"replace the word {a} with {b}", f'change "{a}" to "{b}"',
            f"make the sign say {b} instead of {a}", f'edit the text so it reads "{b}" instead of "{a}"')


def _identity(m, s, t):
    n = noun({**s, "skin_tone": None}, definite=True)
    st, tt = _TONE[s["skin_tone"]], _TONE[t["skin_tone"]]
    if m["operation"] == "skin_tone":
        return (f"change the skin tone of {n} from {st} to {tt}",
                f"give {n} {tt} skin instead of {st} skin, same pose",
                f"make the skin of {n} {tt} rather than {st}, keep everything else")
    other = noun({**t, "skin_tone": None})
    return (f"turn {n} with {st} skin into {other}, same skin tone and pose",
            f"change {n} with {st} skin into {other}",
            f"make {n} with {st} skin {other} instead, keep the {st} skin and the pose")


def _style(m, s, t):
    n, bg = noun(s), s["background"]
    pic = f"this picture of {n} on {_a(bg)} background"
    return {
        "grayscale": (f"make {pic} grayscale", f"convert {pic} to black and white",
                      f"remove all colour from {pic}"),
        "sepia": (f"give {pic} a sepia tone", f"make {pic} look like an old sepia photograph",
                  f"apply a sepia filter to {pic}"),
        "outline": (f"turn {pic} into an outline drawing", f"redraw {pic} as black outlines on white",
                    f"make {pic} a line drawing"),
        "pixelate": (f"make {pic} look like pixel art", f"pixelate {pic}",
                     f"turn {pic} into chunky pixel art"),
        "invert": (f"invert the colours of {pic}", f"make {pic} a colour negative",
                   f"invert {pic}"),
    }[m["operation"]]


_EDIT = {"scene": _scene, "enhancement": _enhance, "object": _object, "text": _text,
         "identity": _identity, "style": _style}


def edit_instructions(meta: dict) -> tuple[str, ...]:
    """All phrasings of the instruction for edit ``meta``."""
    return _EDIT[meta["edit_category"]](meta, meta["source"], meta["target"])


def edit_instruction(meta: dict, template: int) -> str:
    options = edit_instructions(meta)
    return options[template % len(options)]
