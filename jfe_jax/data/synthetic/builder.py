"""Collects the records of a synthetic benchmark while the task builders run.

It owns every identifier (qids and dids count up per dataset id, as in M-BEIR), renders each
image once and names it by creation order, and keeps one candidate per (dataset, key) so that
a candidate shared by several queries or splits has one did. Generation order is fixed, so
the names are too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from jfe_jax.data.mbeir import DATASET_IDS, TASK_MODALITIES, parse_task_name
from jfe_jax.data.synthetic.world import Scene, SceneObject, derive_seed, render, render_card

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class BenchmarkBuilder:
    """The records and images of a synthetic benchmark being written under `root`.

    Args:
      root: the output folder; images are written as they are first asked for.
      seed: the world seed (scene splits and image jitter derive from it).
      image_sizes: (width, height) choices for scene images.
      card_size: (width, height) of the single-object cards of oven_task8.
      split_fractions: fractions of all possible scenes that belong to train, val and test.
      jitter: rendering jitter scale (0 renders every scene the same way).
    """

    def __init__(
        self,
        root: Path,
        *,
        seed: int,
        image_sizes: tuple[tuple[int, int], ...],
        card_size: tuple[int, int],
        split_fractions: tuple[float, float, float],
        jitter: float,
    ):
        self.root = root
        self.seed = seed
        self.image_sizes = image_sizes
        self.card_size = card_size
        self.split_fractions = split_fractions
        self.jitter = jitter
        self.images: dict[tuple[str, str, int], str] = {}  # (folder, scene key, variant) -> path
        self.image_counts: dict[str, int] = {}  # folder/split -> images written
        self.cards: dict[SceneObject, str] = {}
        self.candidates: dict[tuple[int, tuple], dict[str, Any]] = {}  # (dataset id, key) -> rec
        self.by_did: dict[str, dict[str, Any]] = {}
        self.pools: dict[tuple[str, str], dict[str, None]] = {}  # (task, split) -> ordered dids
        self.queries: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._next_qid: dict[int, int] = {}
        self._next_did: dict[int, int] = {}

    # --- world --------------------------------------------------------------------------------

    def split_of(self, scene: Scene) -> str:
        """The split a scene belongs to, a pure function of (seed, scene): a scene never
        appears in two splits, whichever task draws it."""
        u = derive_seed(self.seed, "split", scene.key) / 2.0**64
        train, val, _ = self.split_fractions
        return "train" if u < train else "val" if u < train + val else "test"

    @property
    def num_images(self) -> int:
        """Images written so far."""
        return sum(self.image_counts.values())

    def _save(self, image, folder: str, subfolder: str, stem: str) -> str:
        counter = f"{folder}/{subfolder}"
        index = self.image_counts.get(counter, 0)
        self.image_counts[counter] = index + 1
        relative = f"mbeir_images/{folder}/{subfolder}/{stem}_{index:05d}.png"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fixed settings and no metadata: the bytes depend on the pixels only.
        image.save(path, format="PNG", optimize=False, compress_level=6)
        return relative

    def scene_image(
        self,
        folder: str,
        scene: Scene,
        variant: int = 0,
        *,
        largest: bool = False,
        canvas: tuple[int, int] | None = None,
        draw: Callable[..., Image.Image] = render,
    ) -> str:
        """Path of a rendering of `scene` under mbeir_images/<folder>/<split>/, drawn on first
        use. Different variants of one scene differ in canvas size and jitter; ``largest``
        always takes the largest canvas of ``image_sizes`` (questions about where an object
        is need a picture whose positions survive the model's 28-pixel merged patches).
        ``canvas`` fixes the size instead, and ``draw(scene, size, jitter_seed, jitter)``
        renders scenes of another kind (any object with a ``key``, e.g. spatial.GridScene)."""
        key = (folder, scene.key, variant)
        if key not in self.images:
            seed = derive_seed(self.seed, "render", folder, scene.key, variant)
            size = self.image_sizes[seed % len(self.image_sizes)]
            if largest:
                size = max(self.image_sizes, key=lambda s: s[0] * s[1])
            if canvas is not None:
                size = canvas
            image = draw(scene, size, jitter_seed=seed, jitter=self.jitter)
            split = self.split_of(scene)
            self.images[key] = self._save(image, folder, split, folder.removesuffix("_images"))
        return self.images[key]

    def card_image(self, folder: str, obj: SceneObject) -> str:
        """Path of the card picture of one object (shared by all splits)."""
        card = obj.replace(position="center")
        if card not in self.cards:
            self.cards[card] = self._save(
                render_card(card, self.card_size), folder, "cards", "card"
            )
        return self.cards[card]

    # --- records ------------------------------------------------------------------------------

    def add_candidate(
        self,
        task: str,
        split: str,
        key: tuple,
        *,
        text: str | None,
        image: str | None,
        src: dict[str, Any],
    ) -> str:
        """The did of the candidate named `key` in the task's dataset (made on first use), and
        adds it to the task's pool for `split`."""
        dataset, task_id = parse_task_name(task)
        dataset_id = DATASET_IDS[dataset]
        modality = TASK_MODALITIES[task_id][1]
        full_key = (dataset_id, (modality,) + key)
        record = self.candidates.get(full_key)
        if record is None:
            number = self._next_did.get(dataset_id, 1)
            self._next_did[dataset_id] = number + 1
            record = {
                "did": f"{dataset_id}:{number}",
                "txt": text,
                "img_path": image,
                "modality": modality,
                "src_content": _json(src),
            }
            self.candidates[full_key] = record
            self.by_did[record["did"]] = record
        self.pools.setdefault((task, split), {})[record["did"]] = None
        return record["did"]

    def add_query(
        self,
        task: str,
        split: str,
        *,
        text: str | None,
        image: str | None,
        positives: list[str],
        negatives: list[str],
        src: dict[str, Any],
    ) -> dict[str, Any]:
        """Records a query of `task` in `split`; negatives that are also positives are
        dropped, and repeats are removed keeping the first."""
        dataset, task_id = parse_task_name(task)
        dataset_id = DATASET_IDS[dataset]
        number = self._next_qid.get(dataset_id, 1)
        self._next_qid[dataset_id] = number + 1
        positives = list(dict.fromkeys(positives))
        record = {
            "qid": f"{dataset_id}:{number}",
            "query_txt": text,
            "query_img_path": image,
            "query_modality": TASK_MODALITIES[task_id][0],
            "query_src_content": _json(src),
            "pos_cand_list": positives,
            "neg_cand_list": [d for d in dict.fromkeys(negatives) if d not in positives],
            "task_id": task_id,
        }
        self.queries.setdefault((task, split), []).append(record)
        return record

    def pool(self, task: str, split: str) -> list[dict[str, Any]]:
        """The candidate records of a task's pool for a split, in order of first use."""
        return [self.by_did[did] for did in self.pools.get((task, split), {})]
