"""The synthetic world: scenes of coloured shapes, their captions, edits and renderings.

A scene holds one to three objects, each a (shape, colour, size) at a distinct position
(left, top, center, bottom, right). A scene's `key` names it exactly, so a caption identifies
one scene and two scenes with the same key are the same scene. Images are drawn with PIL
without anti-aliasing, so a rendering is a pure function of (scene, size, jitter seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "pentagon",
    "hexagon",
    "cross",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 140, 30),
    "pink": (245, 120, 190),
    "cyan": (30, 200, 215),
    "brown": (130, 80, 35),
    "black": (25, 25, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
# Order also fixes the order of objects in a canonical caption.
POSITIONS: tuple[str, ...] = ("left", "top", "center", "bottom", "right")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "top": "at the top",
    "center": "in the center",
    "bottom": "at the bottom",
    "right": "on the right",
}
# Object centres as fractions of (width, height). With the radii below, two large objects at
# neighbouring positions at most touch, whatever the aspect ratio and jitter.
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "top": (0.5, 0.18),
    "center": (0.5, 0.5),
    "bottom": (0.5, 0.82),
    "right": (0.82, 0.5),
}
SIZE_RADIUS: dict[str, float] = {"small": 0.08, "large": 0.13}

# Templates around a scene's object phrases, per phrase style (see SceneObject.phrase).
SCENE_WRAPPERS: tuple[tuple[str, ...], ...] = (
    ("{}", "there is {}", "a picture of {}", "the image shows {}"),
    ("{}", "in the picture: {}", "the image shows: {}", "scene: {}"),
)


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes (unlike Python's hash)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape in a scene."""

    shape: str
    colour: str
    size: str
    position: str

    def describe(self) -> str:
        """ "a large red circle" (no position)."""
        return f"a {self.size} {self.colour} {self.shape}"

    def phrase(self, style: int = 0) -> str:
        """The object with its position: style 0 "a large red circle on the left", style 1
        "on the left, a large red circle"."""
        where = POSITION_PHRASES[self.position]
        return f"{self.describe()} {where}" if style == 0 else f"{where}, {self.describe()}"

    def replace(self, **changes: str) -> SceneObject:
        """A copy with some attributes changed."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects at distinct positions, kept in POSITIONS order."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        positions = [o.position for o in self.objects]
        if not 1 <= len(positions) <= len(POSITIONS) or len(set(positions)) != len(positions):
            raise ValueError(f"scene objects need 1-5 distinct positions, got {positions}")
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)

    @property
    def key(self) -> str:
        """A unique name: "large-red-circle@left+small-blue-square@top"."""
        return "+".join(f"{o.size}-{o.colour}-{o.shape}@{o.position}" for o in self.objects)

    def free_positions(self) -> list[str]:
        """Positions no object occupies, in POSITIONS order."""
        taken = {o.position for o in self.objects}
        return [p for p in POSITIONS if p not in taken]

    def with_object(self, index: int, new: SceneObject | None) -> Scene:
        """The scene with object `index` replaced by `new` (or removed when new is None)."""
        objects = list(self.objects)
        if new is None:
            del objects[index]
        else:
            objects[index] = new
        return Scene(tuple(objects))


def caption(scene: Scene) -> str:
    """The canonical caption: objects in POSITIONS order, e.g. "a large red circle on the left
    and a small blue square at the top"."""
    return join_phrases([o.phrase() for o in scene.objects])


def join_phrases(phrases: Sequence[str]) -> str:
    """ "x", "x and y", "x, y and z"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclasses.dataclass(frozen=True)
class TextStyle:
    """How a scene is put into words: object order, phrase style and wrapper template."""

    order: tuple[int, ...]  # a permutation of object indices
    phrase_style: int  # see SceneObject.phrase
    wrapper: int  # index into SCENE_WRAPPERS[phrase_style]

    def render(self, objects: Sequence[SceneObject]) -> str:
        """The text of `objects` (in the order this style names) in this style."""
        phrases = [objects[i].phrase(self.phrase_style) for i in self.order]
        separator = "; " if self.phrase_style == 1 else None
        body = separator.join(phrases) if separator else join_phrases(phrases)
        return SCENE_WRAPPERS[self.phrase_style][self.wrapper].format(body)


def random_style(rng: random.Random, num_objects: int) -> TextStyle:
    """A random TextStyle for a scene of `num_objects`."""
    order = list(range(num_objects))
    rng.shuffle(order)
    phrase_style = rng.randrange(len(SCENE_WRAPPERS))
    return TextStyle(tuple(order), phrase_style, rng.randrange(len(SCENE_WRAPPERS[phrase_style])))


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A random wording of the scene (object order, phrasing and template vary)."""
    return random_style(rng, len(scene.objects)).render(scene.objects)


def random_object(rng: random.Random, position: str) -> SceneObject:
    """A uniformly random object at `position`."""
    return SceneObject(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        size=rng.choice(SIZES),
        position=position,
    )


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """A random scene of min..max objects at distinct random positions."""
    count = rng.randint(min_objects, max_objects)
    return Scene(tuple(random_object(rng, p) for p in rng.sample(POSITIONS, count)))


def object_edits(scene: Scene, index: int) -> list[SceneObject]:
    """Every single-attribute change of object `index`: colour, shape, size or position."""
    obj = scene.objects[index]
    edits = [obj.replace(colour=c) for c in COLOURS if c != obj.colour]
    edits += [obj.replace(shape=s) for s in SHAPES if s != obj.shape]
    edits += [obj.replace(size=s) for s in SIZES if s != obj.size]
    edits += [obj.replace(position=p) for p in scene.free_positions()]
    return edits


def one_attribute_variants(scene: Scene) -> list[tuple[int, SceneObject]]:
    """(object index, replacement) for every scene that differs from this one in exactly one
    attribute of one object: the natural hard negatives."""
    return [(i, new) for i in range(len(scene.objects)) for new in object_edits(scene, i)]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float, star=False):
    points = []
    steps = corners * 2 if star else corners
    for k in range(steps):
        r = radius * (0.45 if star and k % 2 else 1.0)
        angle = rotation + 2 * math.pi * k / steps - math.pi / 2
        points.append((round(cx + r * math.cos(angle)), round(cy + r * math.sin(angle))))
    return points


def draw_object(
    draw: ImageDraw.ImageDraw,
    obj: SceneObject,
    cx: float,
    cy: float,
    radius: float,
    fill: tuple[int, int, int],
    rotation: float = 0.0,
) -> None:
    """Draws one object centred at (cx, cy)."""
    if obj.shape == "circle":
        box = [round(cx - radius), round(cy - radius), round(cx + radius), round(cy + radius)]
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        half = radius * 0.85
        box = [round(cx - half), round(cy - half), round(cx + half), round(cy + half)]
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_polygon(cx, cy + radius * 0.15, radius * 1.1, 3, rotation), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon(_polygon(cx, cy, radius * 1.05, 4, 0.0), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.15, 5, rotation, star=True), fill=fill)
    elif obj.shape == "pentagon":
        draw.polygon(_polygon(cx, cy, radius, 5, rotation), fill=fill)
    elif obj.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, radius, 6, rotation + math.pi / 6), fill=fill)
    elif obj.shape == "cross":
        arm, half = radius * 0.95, radius * 0.32
        draw.rectangle(
            [round(cx - arm), round(cy - half), round(cx + arm), round(cy + half)], fill=fill
        )
        draw.rectangle(
            [round(cx - half), round(cy - arm), round(cx + half), round(cy + arm)], fill=fill
        )
    else:
        raise ValueError(f"shape {obj.shape!r} is unknown, expected one of {SHAPES}")


def render(scene: Scene, size: tuple[int, int], jitter_seed: int, jitter: float = 1.0):
    """Draws a scene on a (width, height) canvas. `jitter_seed` picks small random changes of
    background, colours, positions, radii and rotation (scaled by `jitter`; 0 disables)."""
    rng = random.Random(jitter_seed)
    width, height = size
    grey = 240 + round(rng.uniform(-12, 12) * jitter)
    background = tuple(min(255, grey + round(rng.uniform(-6, 6) * jitter)) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for obj in scene.objects:
        fx, fy = POSITION_XY[obj.position]
        cx = width * (fx + rng.uniform(-0.02, 0.02) * jitter)
        cy = height * (fy + rng.uniform(-0.02, 0.02) * jitter)
        radius = side * SIZE_RADIUS[obj.size] * (1 + rng.uniform(-0.06, 0.06) * jitter)
        fill = tuple(
            max(0, min(255, c + round(rng.uniform(-15, 15) * jitter))) for c in COLOURS[obj.colour]
        )
        rotation = rng.uniform(-0.2, 0.2) * jitter
        draw_object(draw, obj, cx, cy, radius, fill, rotation)
    return image


def render_card(obj: SceneObject, size: tuple[int, int] = (84, 84)) -> Image.Image:
    """An "encyclopedia card" picture of one object alone, centred, with no jitter, so its
    size (small or large) shows against the fixed canvas."""
    return render(Scene((obj.replace(position="center"),)), size, jitter_seed=0, jitter=0.0)
