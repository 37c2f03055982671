"""Edits for composed image retrieval: a reference scene plus a modification text -> target.

The target differs from the reference exactly by the edit, so neither the reference image (it
lacks the edit) nor the text (many scenes admit it) identifies the target alone.
"""

from __future__ import annotations

import dataclasses

from jfe_jax.data.synthetic.world import (
    COLOURS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

# "move it to the left", "move it to the top", ...
_TO_POSITION = {p: "to the " + p for p in POSITION_PHRASES}


@dataclasses.dataclass(frozen=True)
class Modification:
    """One edit of a reference scene: its kind, alternative wordings and the edited scene."""

    kind: str  # recolour | reshape | resize | move | remove | add
    texts: tuple[str, ...]
    target: Scene


def _resize_words(obj: SceneObject) -> tuple[str, str]:
    other = SIZES[1 - SIZES.index(obj.size)]
    return other, ("bigger" if other == "large" else "smaller")


def single_object_modifications(scene: Scene) -> list[Modification]:
    """Edits of a one-object scene, worded as FashionIQ-style feedback about "it"."""
    if len(scene.objects) != 1:
        raise ValueError(f"single-object edits need a one-object scene, got {scene.key}")
    obj = scene.objects[0]
    mods = [
        Modification(
            "recolour",
            (f"make it {c}", f"change the colour to {c}", f"I want it in {c}"),
            scene.with_object(0, obj.replace(colour=c)),
        )
        for c in COLOURS
        if c != obj.colour
    ]
    mods += [
        Modification(
            "reshape",
            (f"make it a {s}", f"I want a {s} instead", f"turn it into a {s}"),
            scene.with_object(0, obj.replace(shape=s)),
        )
        for s in SHAPES
        if s != obj.shape
    ]
    size, comparative = _resize_words(obj)
    mods.append(
        Modification(
            "resize",
            (f"make it {comparative}", f"I want a {size} one"),
            scene.with_object(0, obj.replace(size=size)),
        )
    )
    mods += [
        Modification(
            "move",
            (f"move it {_TO_POSITION[p]}", f"put it {POSITION_PHRASES[p]}"),
            scene.with_object(0, obj.replace(position=p)),
        )
        for p in scene.free_positions()
    ]
    return mods


def refer(scene: Scene, index: int) -> str:
    """The shortest unambiguous name of an object in its scene: "the circle", "the red
    circle", or "the shape on the left"."""
    obj = scene.objects[index]
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return f"the {obj.shape}"
    if sum(o.colour == obj.colour for o in same_shape) == 1:
        return f"the {obj.colour} {obj.shape}"
    return f"the shape {POSITION_PHRASES[obj.position]}"


def multi_object_modifications(scene: Scene, max_objects: int = 3) -> list[Modification]:
    """CIRR-style edits of a scene: recolour, reshape, resize, move or remove one object
    (named unambiguously), or add one (while the scene has fewer than `max_objects`)."""
    mods = []
    for i, obj in enumerate(scene.objects):
        name = refer(scene, i)
        mods += [
            Modification(
                "recolour",
                (f"make {name} {c}", f"change the colour of {name} to {c}"),
                scene.with_object(i, obj.replace(colour=c)),
            )
            for c in COLOURS
            if c != obj.colour
        ]
        mods += [
            Modification(
                "reshape",
                (f"turn {name} into a {s}", f"replace {name} with a {obj.size} {obj.colour} {s}"),
                scene.with_object(i, obj.replace(shape=s)),
            )
            for s in SHAPES
            if s != obj.shape
        ]
        size, comparative = _resize_words(obj)
        mods.append(
            Modification(
                "resize",
                (f"make {name} {comparative}", f"make {name} {size}"),
                scene.with_object(i, obj.replace(size=size)),
            )
        )
        mods += [
            Modification(
                "move",
                (f"move {name} {_TO_POSITION[p]}",),
                scene.with_object(i, obj.replace(position=p)),
            )
            for p in scene.free_positions()
        ]
        if len(scene.objects) > 1:
            mods.append(
                Modification(
                    "remove", (f"remove {name}", f"take away {name}"), scene.with_object(i, None)
                )
            )
    if len(scene.objects) < max_objects:
        for p in scene.free_positions():
            for s in SHAPES:
                for c in COLOURS:
                    for size in SIZES:
                        new = SceneObject(s, c, size, p)
                        mods.append(
                            Modification(
                                "add",
                                (f"add {new.phrase()}",),
                                Scene(scene.objects + (new,)),
                            )
                        )
    return mods


def kinds(mods: list[Modification]) -> list[str]:
    """The kinds present in `mods`, in order of first appearance (deterministic)."""
    return list(dict.fromkeys(m.kind for m in mods))
