"""Spatial questions (infoseek_task6): a task that needs fusion by construction.

A query is a picture of nine objects on a 3x3 grid plus a question that names one cell ("what
is in the top-left corner?"); the candidate is the answer text "a large red circle". Every
object of a scene has its own colour and shape, so the nine answers of an image are distinct.
Each cell is painted with a fixed light tint of its own (CELL_TINTS: the top-left cell always
pink, the center white, ...), the same in every image. Each split's pool is every possible
answer (8 shapes x 10 colours x 2 sizes = 160), so chance at the headline R@5 is 5/160 =
3.1%; the hard negatives are the other objects of the same image, first the one a text-blind
model confuses most (below).

Queries come in groups of four built as an XOR: a scene B, its partner P = B with the objects
of two cells p and q swapped, and two questions T_p, T_q (the same strings for both images):

    a(B, T_p) = a(P, T_q) = c        a(B, T_q) = a(P, T_p) = c'  (c != c')

Neither modality alone determines the answer: each image is asked two questions with different
answers, and each question text is asked of two images with different answers.

Why late fusion is limited here and early fusion is not. Late fusion embeds the image and the
text apart and sums them, so its score of candidate c is <e(img) + e(txt), c> =
<e(img), c> + <e(txt), c>: additive, f(image, c) + g(text, c), whatever the encoders. Within a
group, write d(I, T) = s(I, T, c) - s(I, T, c'); additivity gives
d(B, T_p) + d(P, T_q) = d(B, T_q) + d(P, T_p), but ranking all four queries right needs the
left side positive and the right side negative. So any additive scorer ranks at least one query
of every complete group below its top-1, and its Recall@1 is at most 75% on this task. Beyond
the exact bound, the text names a cell while every candidate attribute sits in some cell of the
same image, so <e(txt), c> cannot know which attribute the image puts there: a late-fusion
model in effect ranks the image's nine objects the same way for every question about it
(Recall@5 about 5/9). Early fusion reads the question and the pixels in one sequence from the
first layer, so it can compute "the attributes of the object in the named cell" and rank every
query right (tests/test_fusion_task.py: an oracle reading both does).

The 84x84 canvas puts each cell on exactly one 28-pixel merged patch of Qwen2-VL (and within
the demo's image_max_pixels and patch budget).

Why the tints. Qwen2-VL's vision tower has no absolute position embedding: a cell's place reaches
the language model only through M-RoPE, which at the small sizes' head dimension (16) and
rope_theta 10^6 turns a query by at most 0.032 rad per row and 1.8e-4 per column, so cells are
nearly indistinguishable by position alone. Untinted, the tiny model did not learn the task
(trained on it alone: R@5 5.0-7.5% against 3.1% chance at 1200 training queries; at 9600, in-batch
accuracy 8% after 3200 steps, where the tinted task was at 12%). With a fixed tint per cell the
cell is also content, and attention can select by content, as it does for colours: trained alone on
9600 training queries for 4800 stage-2 steps, tiny reaches R@5 29.2% (9.3x chance), 0.8% without
the image and 3.8% without the text (benchmarks/bench_fusion_task.py; benchmarks/README.md, "Fusion
study"). The tints do not help a sum of embeddings: they are the same in every image and tell
nothing about which object a question selects, so the XOR bound above holds unchanged. Questions by
neighbour relation ("just left of the red circle") were dropped with them: with tints they were
learned more slowly than positions (in-batch accuracy 6% against 12% after 3200 steps, side by
side).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from PIL import Image, ImageDraw

from jfe_jax.data.synthetic.builder import BenchmarkBuilder
from jfe_jax.data.synthetic.world import COLOURS, SHAPES, SIZES, SceneObject, draw_object

TASK = "infoseek_task6"
GRID_CANVAS: tuple[int, int] = (84, 84)
# Cells in reading order, with their (row, column).
GRID_CELLS: dict[str, tuple[int, int]] = {
    "top-left": (0, 0),
    "top": (0, 1),
    "top-right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom-left": (2, 0),
    "bottom": (2, 1),
    "bottom-right": (2, 2),
}
CELL_PHRASES: dict[str, str] = {
    "top-left": "in the top-left corner",
    "top": "in the middle of the top row",
    "top-right": "in the top-right corner",
    "left": "in the middle of the left column",
    "center": "in the center",
    "right": "in the middle of the right column",
    "bottom-left": "in the bottom-left corner",
    "bottom": "in the middle of the bottom row",
    "bottom-right": "in the bottom-right corner",
}
# Each cell's fixed background tint (RGB; jittered a little per image like every colour).
CELL_TINTS: dict[str, tuple[int, int, int]] = {
    "top-left": (255, 180, 180),
    "top": (180, 235, 180),
    "top-right": (180, 200, 255),
    "left": (250, 240, 150),
    "center": (255, 255, 255),
    "right": (175, 240, 240),
    "bottom-left": (255, 210, 150),
    "bottom": (225, 180, 245),
    "bottom-right": (170, 170, 170),
}
QUESTIONS: tuple[str, ...] = (
    "what is {}?",
    "which shape is {}?",
    "what do you see {}?",
    "name the object {}.",
)
# Radii as fractions of a cell's side: a large star or triangle stays inside its cell.
GRID_RADIUS: dict[str, float] = {"small": 0.22, "large": 0.36}
# Drawing a group whose two scenes both fall in the asked split takes ~1/0.15^2 = 44 tries
# for val; the bound only turns an impossible request into an error.
MAX_DRAWS = 10_000


@dataclasses.dataclass(frozen=True)
class GridScene:
    """Nine objects, one per cell of a 3x3 grid (SceneObject.position is the cell name), no
    two of the same colour and shape; kept in GRID_CELLS order."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        cells = sorted(o.position for o in self.objects)
        if cells != sorted(GRID_CELLS):
            raise ValueError(
                f"a grid scene needs one object in each of {list(GRID_CELLS)}, got cells {cells}"
            )
        kinds = {(o.colour, o.shape) for o in self.objects}
        if len(kinds) != len(self.objects):
            raise ValueError(
                f"grid scene objects must differ in colour or shape, got {len(kinds)} distinct "
                f"(colour, shape) pairs among {len(self.objects)} objects"
            )
        order = list(GRID_CELLS)
        ordered = tuple(sorted(self.objects, key=lambda o: order.index(o.position)))
        object.__setattr__(self, "objects", ordered)

    @property
    def key(self) -> str:
        """A unique name: "grid:large-red-circle@top-left+...", in cell order."""
        return "grid:" + "+".join(
            f"{o.size}-{o.colour}-{o.shape}@{o.position}" for o in self.objects
        )

    def at(self, cell: str) -> SceneObject:
        """The object in `cell`."""
        return self.objects[list(GRID_CELLS).index(cell)]

    def swap(self, cell: str, other: str) -> GridScene:
        """The scene with the objects of two cells exchanged."""
        a, b = self.at(cell), self.at(other)
        moved = {cell: b.replace(position=cell), other: a.replace(position=other)}
        return GridScene(tuple(moved.get(o.position, o) for o in self.objects))


def random_grid_scene(rng: random.Random) -> GridScene:
    """Nine distinct (colour, shape) pairs in random cells, each of a random size."""
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], len(GRID_CELLS))
    return GridScene(
        tuple(
            SceneObject(shape=shape, colour=colour, size=rng.choice(SIZES), position=cell)
            for cell, (colour, shape) in zip(GRID_CELLS, kinds)
        )
    )


def render_grid(
    scene: GridScene, size: tuple[int, int], jitter_seed: int, jitter: float = 1.0
) -> Image.Image:
    """Draws a grid scene: each cell filled with its CELL_TINTS tint, each object centred in
    its cell; `jitter_seed` picks small changes of tints, colours, centres, radii and rotation
    as world.render does."""
    rng = random.Random(jitter_seed)
    width, height = size
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width / 3, height / 3
    for cell, (row, col) in GRID_CELLS.items():
        tint = tuple(
            max(0, min(255, c + round(rng.uniform(-6, 6) * jitter))) for c in CELL_TINTS[cell]
        )
        box = [round(col * cell_w), round(row * cell_h)]  # PIL includes both corners
        box += [round((col + 1) * cell_w) - 1, round((row + 1) * cell_h) - 1]
        draw.rectangle(box, fill=tint)
    for obj in scene.objects:
        row, col = GRID_CELLS[obj.position]
        cx = cell_w * (col + 0.5 + rng.uniform(-0.03, 0.03) * jitter)
        cy = cell_h * (row + 0.5 + rng.uniform(-0.03, 0.03) * jitter)
        radius = (
            min(cell_w, cell_h) * GRID_RADIUS[obj.size] * (1 + rng.uniform(-0.06, 0.06) * jitter)
        )
        fill = tuple(
            max(0, min(255, c + round(rng.uniform(-15, 15) * jitter))) for c in COLOURS[obj.colour]
        )
        draw_object(draw, obj, cx, cy, radius, fill, rng.uniform(-0.2, 0.2) * jitter)
    return image


@dataclasses.dataclass(frozen=True)
class Group:
    """One XOR group: a scene, its partner with two cells swapped, and a question per cell."""

    base: GridScene
    partner: GridScene
    questions: tuple[tuple[str, str], ...]  # (asked cell, question text), two of them


def random_group(rng: random.Random) -> Group:
    """A random group: a scene, two of its cells, each asked by position."""
    base = random_grid_scene(rng)
    cells = rng.sample(list(GRID_CELLS), 2)
    questions = tuple((c, rng.choice(QUESTIONS).format(CELL_PHRASES[c])) for c in cells)
    return Group(base, base.swap(*cells), questions)


def answer_candidate(bench: BenchmarkBuilder, task: str, split: str, obj: SceneObject) -> str:
    """The answer text "a large red circle" as a candidate of `task` (added to the pool)."""
    return bench.add_candidate(
        task,
        split,
        ("answer", obj.describe()),
        text=obj.describe(),
        image=None,
        src={"object": obj.describe()},
    )


def build_spatial_questions(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """infoseek_task6: (3x3 grid image, question naming a cell) -> the object's description.

    Queries come in XOR groups of four (module docstring), so `count` a multiple of 4 gives
    complete groups only. The pool is every possible answer; the hard negatives are the object
    of the group's other asked cell (what the same text names in the partner), then the
    image's other objects.
    """
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                answer_candidate(bench, task, split, SceneObject(shape, colour, size, "center"))
    used: set[str] = set()
    made = 0
    for _group in range((count + 3) // 4):
        for _ in range(MAX_DRAWS):
            group = random_group(rng)
            scenes = (group.base, group.partner)
            fresh = all(s.key not in used for s in scenes)
            if fresh and all(bench.split_of(s) == split for s in scenes):
                used.update(s.key for s in scenes)
                break
        else:
            raise ValueError(
                f"{task} {split}: could not draw a new group after {MAX_DRAWS} draws "
                f"({len(used)} scenes drawn); ask for fewer queries per task"
            )
        for scene in scenes:
            image = bench.scene_image(
                f"{task.split('_task')[0]}_images", scene, canvas=GRID_CANVAS, draw=render_grid
            )
            dids = {o.position: answer_candidate(bench, task, split, o) for o in scene.objects}
            (cell_p, _), (cell_q, _) = group.questions
            for cell, text in group.questions:
                if made == count:
                    return
                confused = cell_q if cell == cell_p else cell_p
                rest = [dids[c] for c in GRID_CELLS if c not in (cell, confused)]
                rng.shuffle(rest)
                src = {"scene": scene.key, "cell": cell}
                bench.add_query(
                    task,
                    split,
                    text=text,
                    image=image,
                    positives=[dids[cell]],
                    negatives=[dids[confused], *rest][:negatives],
                    src=src,
                )
                made += 1


def grid_captions(
    bench: BenchmarkBuilder, rng: random.Random, count: int, first_id: int = 0
) -> list[dict[str, Any]]:
    """`count` stage-1 (image, caption) pairs of train-split grid scenes, in the format of
    pairs.image_captions: the grid as infoseek_task6 draws it, captioned with its nine objects
    in reading order ("a grid of a large red circle, a small blue star, ..."). They teach the
    vision tower and the decoder to see the nine small objects of a grid in stage 1 (both
    systems' towers: a late-fusion model reads the same captions); no caption names a cell."""
    used: set[str] = set()
    out = []
    for n in range(count):
        for _ in range(MAX_DRAWS):
            scene = random_grid_scene(rng)
            if scene.key not in used and bench.split_of(scene) == "train":
                break
        else:
            raise ValueError(
                f"grid captions: could not draw a new train-split grid after {MAX_DRAWS} draws"
            )
        used.add(scene.key)
        image = bench.scene_image("pairs_images", scene, canvas=GRID_CANVAS, draw=render_grid)
        caption = "a grid of " + ", ".join(o.describe() for o in scene.objects)
        out.append({"id": f"ic:{first_id + n}", "image_path": image, "caption": caption})
    return out
