"""The tiny world's vocabulary: categories, subjects, attributes and installed data paths.

Plain tables, no rendering: :mod:`fewstep.bench.world` re-exports every name, so callers keep
using ``world.PORTRAIT``, ``world.COLORS`` and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORLD_VERSION = "1"

T2I_CATEGORIES: tuple[str, ...] = ("portrait", "landscape", "text")
EDIT_CATEGORIES: tuple[str, ...] = ("scene", "enhancement", "object", "text", "identity", "style")
EDIT_OPERATIONS: dict[str, tuple[str, ...]] = {
    "scene": ("change_background",),
    "enhancement": ("deblur", "denoise", "upscale"),
    "object": ("add", "remove", "replace"),
    "text": ("replace_word",),
    "identity": ("skin_tone", "gender"),
    "style": ("grayscale", "sepia", "outline", "pixelate", "invert"),
}
DEGRADATION_OF = {"deblur": "blur", "denoise": "noise", "upscale": "lowres"}
STYLES: tuple[str, ...] = EDIT_OPERATIONS["style"]
SKIN_TONES: tuple[str, ...] = ("light", "medium-light", "medium", "medium-dark", "dark")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
TEXT_POSITIONS: tuple[str, ...] = ("center", "top", "bottom")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2)
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT_SIZE = 109  # the only size a CBDT bitmap font loads at

COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (20, 20, 20), "red": (210, 35, 40),
    "orange": (245, 140, 20), "yellow": (250, 215, 30), "green": (40, 160, 60),
    "teal": (0, 140, 140), "blue": (35, 75, 200), "purple": (125, 50, 170),
}
BACKGROUNDS: tuple[str, ...] = ("white", "black", "red", "orange", "green", "teal", "blue", "purple")
TEXT_COLORS: tuple[str, ...] = ("black", "white", "red", "yellow", "blue")

# Font key -> (words used in prompts, file name, Debian package that ships it).
FONTS: dict[str, tuple[str, str, str]] = {
    "sans": ("sans-serif", "dejavu/DejaVuSans-Bold.ttf", "fonts-dejavu"),
    "serif": ("serif", "liberation/LiberationSerif-Bold.ttf", "fonts-liberation"),
    "mono": ("monospace", "liberation/LiberationMono-Bold.ttf", "fonts-liberation"),
    "italic": ("italic", "freefont/FreeSerifBoldItalic.ttf", "fonts-freefont-ttf"),
}
FONT_ROOT = Path("/usr/share/fonts/truetype")

WORDS: tuple[str, ...] = (
    "SUN", "MOON", "STAR", "TREE", "FISH", "BIRD", "CAKE", "LOVE", "HOME", "RAIN",
    "SNOW", "FIRE", "WIND", "ROCK", "GOLD", "JAZZ", "ZOOM", "OPEN", "STOP", "SALE",
    "HELLO", "PARTY", "MUSIC", "CAFE", "BOOK", "KING", "LION", "WOLF", "BEAR", "FROG",
    "MILK", "TAXI", "HOTEL", "PIZZA", "SMILE", "DREAM", "OCEAN", "RIVER", "APPLE", "LEMON",
)


@dataclass(frozen=True)
class Subject:
    """One emoji subject. ``cldr`` is its name in emoji-test.txt (fully-qualified)."""

    key: str
    cldr: str
    name: str
    plural: str
    tones: bool = False  # has the five skin-tone variants
    swap: str | None = None  # key of the other-gender variant


def _s(key, cldr, name=None, plural=None, tones=False, swap=None) -> Subject:
    name = name or cldr
    return Subject(key, cldr, name, plural or name + "s", tones, swap)


_PEOPLE_PAIRS = [("man", "woman", "man", "woman"), ("boy", "girl", "boy", "girl"),
                 ("old_man", "old_woman", "old man", "old woman"),
                 ("man_cook", "woman_cook", "man cook", "woman cook"),
                 ("man_astronaut", "woman_astronaut", "man astronaut", "woman astronaut"),
                 ("man_firefighter", "woman_firefighter", "man firefighter", "woman firefighter"),
                 ("man_scientist", "woman_scientist", "man scientist", "woman scientist")]
_IRREGULAR = {"man": "men", "woman": "women"}


def _plural(name: str) -> str:
    head, _, last = name.rpartition(" ")
    last = _IRREGULAR.get(last, last + "s")
    return f"{head} {last}".strip()


PORTRAIT: tuple[Subject, ...] = (
    _s("grinning_face", "grinning face"),
    _s("sunglasses_face", "smiling face with sunglasses", "face with sunglasses", "faces with sunglasses"),
    _s("joy_face", "face with tears of joy", "laughing face"),
    _s("winking_face", "winking face"),
    _s("heart_eyes_face", "smiling face with heart-eyes", "heart-eyes face"),
    _s("thinking_face", "thinking face"),
    _s("sleeping_face", "sleeping face"),
    _s("angry_face", "angry face"),
    _s("crying_face", "loudly crying face", "crying face"),
    _s("screaming_face", "face screaming in fear", "screaming face"),
    _s("cowboy_face", "cowboy hat face", "cowboy face"),
    _s("partying_face", "partying face"),
    _s("baby", "baby", plural="babies", tones=True),
    *(s for a, b, na, nb in _PEOPLE_PAIRS for s in (
        _s(a, na, plural=_plural(na), tones=True, swap=b),
        _s(b, nb, plural=_plural(nb), tones=True, swap=a))),
)
LANDSCAPE: tuple[Subject, ...] = (
    _s("mountain", "mountain"), _s("snow_mountain", "snow-capped mountain"),
    _s("volcano", "volcano", plural="volcanoes"), _s("camping", "camping", "campsite"),
    _s("house", "house"), _s("castle", "castle"), _s("sun", "sun"), _s("cloud", "cloud"),
    _s("rainbow", "rainbow"), _s("snowflake", "snowflake"), _s("crescent_moon", "crescent moon"),
    _s("tornado", "tornado", plural="tornadoes"), _s("water_wave", "water wave", "ocean wave"),
    _s("deciduous_tree", "deciduous tree", "tree"), _s("evergreen_tree", "evergreen tree", "pine tree"),
    _s("palm_tree", "palm tree"), _s("cactus", "cactus", plural="cacti"),
    _s("sunflower", "sunflower"), _s("fish", "fish", plural="fish"), _s("whale", "spouting whale", "whale"),
    _s("turtle", "turtle"), _s("cat", "cat"), _s("cow", "cow"), _s("bird", "bird"),
)
COMPANIONS: tuple[Subject, ...] = (
    _s("star", "star"), _s("heart", "red heart", "heart"), _s("balloon", "balloon"),
    _s("soccer_ball", "soccer ball"), _s("apple", "red apple", "apple"), _s("gift", "wrapped gift", "gift"),
    _s("crown", "crown"), _s("note", "musical note", "music note"), _s("umbrella", "umbrella"),
    _s("rose", "rose"),
)
SUBJECTS: dict[str, tuple[Subject, ...]] = {"portrait": PORTRAIT, "landscape": LANDSCAPE}
_BY_KEY: dict[str, Subject] = {s.key: s for s in (*PORTRAIT, *LANDSCAPE, *COMPANIONS)}
IDENTITY_SUBJECTS: tuple[str, ...] = tuple(s.key for s in PORTRAIT if s.tones)
GENDER_SUBJECTS: tuple[str, ...] = tuple(s.key for s in PORTRAIT if s.swap)

SIZE_FRACTION = {"small": 0.34, "large": 0.62}
PAIR_SCALE = 0.72  # each of two copies is this much smaller than one
MARGIN = 0.03

__all__ = [  # everything public, plus the subject index world.subject() reads
    "WORLD_VERSION",
    "T2I_CATEGORIES",
    "EDIT_CATEGORIES",
    "EDIT_OPERATIONS",
    "DEGRADATION_OF",
    "STYLES",
    "SKIN_TONES",
    "POSITIONS",
    "TEXT_POSITIONS",
    "SIZES",
    "COUNTS",
    "OPPOSITE",
    "EMOJI_FONT",
    "EMOJI_TEST",
    "EMOJI_FONT_SIZE",
    "COLORS",
    "BACKGROUNDS",
    "TEXT_COLORS",
    "FONTS",
    "FONT_ROOT",
    "WORDS",
    "Subject",
    "PORTRAIT",
    "LANDSCAPE",
    "COMPANIONS",
    "SUBJECTS",
    "_BY_KEY",
    "IDENTITY_SUBJECTS",
    "GENDER_SUBJECTS",
    "SIZE_FRACTION",
    "PAIR_SCALE",
    "MARGIN",
]
