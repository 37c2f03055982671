"""The synthetic tasks, named after the M-BEIR tasks whose modalities they share.

Each builder draws `count` queries of one task in one split, with their positive and hard
negative candidates. Every query needs what its modalities say:
  mscoco_task0     text -> image           caption -> the scene's image
  mscoco_task3     image -> text           image -> its caption
  webqa_task1      text -> text            paraphrase -> the scene's description
  webqa_task2      text -> (image, text)   paraphrase -> image + a note naming one object; hard
                                           negatives share the note, so the image decides
  nights_task4     image -> image          a rendering -> another rendering (size, jitter)
  oven_task6       (image, text) -> text   "what is on the left?" -> "a large red circle"; the
                                           other objects of the same image are negatives
  oven_task8       (image, text) -> (image, text)  same question -> the object's card (picture
                                           + "a red circle"; the size shows only in the picture)
  fashioniq_task7  (image, text) -> image  one object + "make it green" -> the edited scene
  cirr_task7       (image, text) -> image  1-3 objects + "make the circle green" -> edited scene
Hard negatives differ from the positive in one attribute of one object, and come from the
same split.

One more family is registered but not among the defaults (see generate.STUDY_TASKS):
  infoseek_task6   (image, text) -> text   3x3 grid on tinted cells + "what is in the center?"
                                           -> "a large red circle"; needs fusion by
                                           construction (spatial.py)
"""

from __future__ import annotations

import random
from collections.abc import Callable

from jfe_jax.data.synthetic import composed
from jfe_jax.data.synthetic.builder import BenchmarkBuilder
from jfe_jax.data.synthetic.spatial import answer_candidate, build_spatial_questions
from jfe_jax.data.synthetic.world import (
    POSITION_PHRASES,
    Scene,
    caption,
    one_attribute_variants,
    paraphrase,
    random_scene,
)

# Rejection sampling of a scene for a split rarely needs more than ~10 draws; this bound only
# turns an impossible request (more distinct queries than the world holds) into an error.
MAX_DRAWS = 10_000

QUESTIONS: tuple[str, ...] = (
    "what is {}?",
    "which shape is {}?",
    "what do you see {}?",
    "name the object {}.",
)


def draw_scene(
    bench: BenchmarkBuilder,
    rng: random.Random,
    split: str,
    used: set[str],
    *,
    task: str,
    min_objects: int = 1,
    max_objects: int = 3,
) -> Scene:
    """A random scene of `split` whose key is not in `used` (and adds it)."""
    for _ in range(MAX_DRAWS):
        scene = random_scene(rng, min_objects, max_objects)
        if scene.key not in used and bench.split_of(scene) == split:
            used.add(scene.key)
            return scene
    raise ValueError(
        f"{task} {split}: could not draw a new scene with {min_objects}-"
        f"{max_objects} objects after {MAX_DRAWS} draws ({len(used)} drawn); ask "
        "for fewer queries per task"
    )


def hard_negative_scenes(
    bench: BenchmarkBuilder,
    rng: random.Random,
    scene: Scene,
    count: int,
) -> list[Scene]:
    """Up to `count` scenes of the same split that differ from `scene` in one attribute."""
    split = bench.split_of(scene)
    variants = [scene.with_object(i, new) for i, new in one_attribute_variants(scene)]
    rng.shuffle(variants)
    return [v for v in variants if bench.split_of(v) == split][:count]


def _dataset(task: str) -> str:
    return task.split("_task")[0]


def scene_candidate(
    bench: BenchmarkBuilder, task: str, split: str, scene: Scene, variant: int = 0
) -> str:
    """An image candidate showing `scene`."""
    image = bench.scene_image(f"{_dataset(task)}_images", scene, variant)
    return bench.add_candidate(
        task, split, ("scene", scene.key, variant), text=None, image=image, src={"scene": scene.key}
    )


def build_text_to_image(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """mscoco_task0: a paraphrased caption -> the scene's image."""
    used: set[str] = set()
    for _ in range(count):
        scene = draw_scene(bench, rng, split, used, task=task)
        positive = scene_candidate(bench, task, split, scene)
        negs = [
            scene_candidate(bench, task, split, v)
            for v in hard_negative_scenes(bench, rng, scene, negatives)
        ]
        bench.add_query(
            task,
            split,
            text=paraphrase(scene, rng),
            image=None,
            positives=[positive],
            negatives=negs,
            src={"scene": scene.key},
        )


def build_image_to_text(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """mscoco_task3: an image -> its canonical caption."""
    used: set[str] = set()

    def candidate(scene: Scene) -> str:
        return bench.add_candidate(
            task,
            split,
            ("caption", scene.key),
            text=caption(scene),
            image=None,
            src={"scene": scene.key},
        )

    for _ in range(count):
        scene = draw_scene(bench, rng, split, used, task=task)
        negs = [candidate(v) for v in hard_negative_scenes(bench, rng, scene, negatives)]
        image = bench.scene_image(f"{_dataset(task)}_images", scene)
        bench.add_query(
            task,
            split,
            text=None,
            image=image,
            positives=[candidate(scene)],
            negatives=negs,
            src={"scene": scene.key},
        )


def build_text_to_text(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """webqa_task1: a paraphrase -> the scene's description, written as a short document."""
    used: set[str] = set()

    def candidate(scene: Scene) -> str:
        return bench.add_candidate(
            task,
            split,
            ("description", scene.key),
            text=f"Scene description: {caption(scene)}.",
            image=None,
            src={"scene": scene.key},
        )

    for _ in range(count):
        scene = draw_scene(bench, rng, split, used, task=task)
        negs = [candidate(v) for v in hard_negative_scenes(bench, rng, scene, negatives)]
        bench.add_query(
            task,
            split,
            text=paraphrase(scene, rng),
            image=None,
            positives=[candidate(scene)],
            negatives=negs,
            src={"scene": scene.key},
        )


def build_text_to_image_text(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """webqa_task2: a paraphrase -> (image, note about one object). Most negatives keep the
    note and change another object, so only the image tells them apart."""
    used: set[str] = set()

    def candidate(scene: Scene, focus) -> str:
        image = bench.scene_image(f"{_dataset(task)}_images", scene)
        return bench.add_candidate(
            task,
            split,
            ("focus", scene.key, focus.phrase()),
            text=f"a picture with {focus.phrase()}",
            image=image,
            src={"scene": scene.key, "focus": focus.phrase()},
        )

    for _ in range(count):
        scene = draw_scene(bench, rng, split, used, task=task, min_objects=2)
        index = rng.randrange(len(scene.objects))
        focus = scene.objects[index]
        # (variant, its focus object): an edit of another object keeps the note.
        variants = [
            (scene.with_object(i, new), new if i == index else focus)
            for i, new in one_attribute_variants(scene)
        ]
        variants = [v for v in variants if bench.split_of(v[0]) == split]
        rng.shuffle(variants)
        same_note = [v for v in variants if v[1] == focus][: min(negatives, max(1, negatives - 1))]
        other_note = [v for v in variants if v[1] != focus][: negatives - len(same_note)]
        negs = [candidate(v, f) for v, f in same_note + other_note]
        bench.add_query(
            task,
            split,
            text=paraphrase(scene, rng),
            image=None,
            positives=[candidate(scene, focus)],
            negatives=negs,
            src={"scene": scene.key, "focus": focus.phrase()},
        )


def build_image_to_image(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """nights_task4: one rendering of a scene -> another rendering (other size and jitter)."""
    used: set[str] = set()
    for _ in range(count):
        scene = draw_scene(bench, rng, split, used, task=task)
        positive = scene_candidate(bench, task, split, scene, variant=1)
        negs = [
            scene_candidate(bench, task, split, v, variant=1)
            for v in hard_negative_scenes(bench, rng, scene, negatives)
        ]
        image = bench.scene_image(f"{_dataset(task)}_images", scene, variant=0)
        bench.add_query(
            task,
            split,
            text=None,
            image=image,
            positives=[positive],
            negatives=negs,
            src={"scene": scene.key},
        )


def _question_queries(bench, task, split, rng, count, negatives, candidate):
    """Shared by oven_task6/8: (scene image, question about one position) -> the object."""
    used: set[str] = set()
    for _ in range(count):
        scene = draw_scene(bench, rng, split, used, task=task, min_objects=2)
        index = rng.randrange(len(scene.objects))
        obj = scene.objects[index]
        question = rng.choice(QUESTIONS).format(POSITION_PHRASES[obj.position])
        # First the same object in the other size (for oven_task8 its card has the same
        # text), then the other objects of the image (what a text-blind model would pick).
        others = [o for i, o in enumerate(scene.objects) if i != index]
        rng.shuffle(others)
        other_size = "small" if obj.size == "large" else "large"
        negs = [candidate(o) for o in [obj.replace(size=other_size), *others][:negatives]]
        # The largest canvas: on a 56-pixel one the five positions share 2x2 merged patches.
        image = bench.scene_image(f"{_dataset(task)}_images", scene, largest=True)
        bench.add_query(
            task,
            split,
            text=question,
            image=image,
            positives=[candidate(obj)],
            negatives=negs,
            src={"scene": scene.key, "position": obj.position},
        )


def build_question_to_answer(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """oven_task6: (image, "what is on the left?") -> "a large red circle"."""

    def candidate(obj) -> str:
        return answer_candidate(bench, task, split, obj)

    _question_queries(bench, task, split, rng, count, negatives, candidate)


def build_question_to_card(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """oven_task8: (image, question) -> (card picture, "a red circle"). Cards of one shape
    and colour share their text; only the picture shows the size."""

    def candidate(obj) -> str:
        image = bench.card_image(f"{_dataset(task)}_images", obj)
        return bench.add_candidate(
            task,
            split,
            ("card", obj.describe()),
            text=f"a {obj.colour} {obj.shape}",
            image=image,
            src={"object": obj.describe()},
        )

    _question_queries(bench, task, split, rng, count, negatives, candidate)


def _composed_queries(
    bench, task, split, rng, count, negatives, *, min_objects, max_objects, modifications
):
    used: set[tuple[str, str]] = set()
    for _ in range(count):
        for _ in range(MAX_DRAWS):
            reference = random_scene(rng, min_objects, max_objects)
            if bench.split_of(reference) != split:
                continue
            mods = [m for m in modifications(reference) if bench.split_of(m.target) == split]
            if not mods:
                continue
            kind = rng.choice(composed.kinds(mods))  # kind first: "add" has many variants
            mod = rng.choice([m for m in mods if m.kind == kind])
            text = rng.choice(mod.texts)
            if (reference.key, text) not in used:
                used.add((reference.key, text))
                break
        else:
            raise ValueError(
                f"{task} {split}: could not draw a new (reference, edit) pair "
                f"after {MAX_DRAWS} draws; ask for fewer queries per task"
            )
        # The reference itself, then other edits of the same kind, are the hard negatives.
        alternatives = [m.target for m in mods if m.kind == kind and m.target != mod.target]
        rng.shuffle(alternatives)
        negs = [
            scene_candidate(bench, task, split, s) for s in [reference, *alternatives][:negatives]
        ]
        image = bench.scene_image(f"{_dataset(task)}_images", reference)
        positive = scene_candidate(bench, task, split, mod.target)
        bench.add_query(
            task,
            split,
            text=text,
            image=image,
            positives=[positive],
            negatives=negs,
            src={"reference": reference.key, "target": mod.target.key, "modification": kind},
        )


def build_fashioniq(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """fashioniq_task7: (one-object image, "make it green") -> the edited image."""
    _composed_queries(
        bench,
        task,
        split,
        rng,
        count,
        negatives,
        min_objects=1,
        max_objects=1,
        modifications=composed.single_object_modifications,
    )


def build_cirr(
    bench: BenchmarkBuilder, task: str, split: str, rng: random.Random, count: int, negatives: int
) -> None:
    """cirr_task7: (image of 1-3 objects, "make the circle green") -> the edited image."""
    _composed_queries(
        bench,
        task,
        split,
        rng,
        count,
        negatives,
        min_objects=1,
        max_objects=3,
        modifications=composed.multi_object_modifications,
    )


# task name -> builder(bench, task, split, rng, count, negatives)
TASK_BUILDERS: dict[str, Callable] = {
    "mscoco_task0": build_text_to_image,
    "mscoco_task3": build_image_to_text,
    "webqa_task1": build_text_to_text,
    "webqa_task2": build_text_to_image_text,
    "nights_task4": build_image_to_image,
    "oven_task6": build_question_to_answer,
    "oven_task8": build_question_to_card,
    "fashioniq_task7": build_fashioniq,
    "cirr_task7": build_cirr,
    "infoseek_task6": build_spatial_questions,
}
