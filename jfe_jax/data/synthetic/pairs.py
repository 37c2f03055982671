"""Stage-1 (post-training adaptation) pair data drawn from the synthetic world.

Two jsonl files under pairs/, from train-split scenes only:
  text_triples.jsonl    {"id": "tt:<n>", "sentence": str, "positive": str,
                         "hard_negative": str}
      NLI style: the positive words the same scene differently; the hard negative keeps the
      sentence's wording but changes one attribute of one object (so it is a different scene).
  image_captions.jsonl  {"id": "ic:<n>", "image_path": str, "caption": str}
      image_path is relative to the benchmark root (mbeir_images/pairs_images/train/...).
"""

from __future__ import annotations

import random
from typing import Any

from jfe_jax.data.synthetic.builder import BenchmarkBuilder
from jfe_jax.data.synthetic.tasks import draw_scene
from jfe_jax.data.synthetic.world import one_attribute_variants, paraphrase, random_style

TEXT_TRIPLES_FILE = "pairs/text_triples.jsonl"
IMAGE_CAPTIONS_FILE = "pairs/image_captions.jsonl"


def text_triples(bench: BenchmarkBuilder, rng: random.Random, count: int) -> list[dict[str, Any]]:
    """`count` (sentence, positive paraphrase, one-attribute hard negative) triples."""
    used: set[str] = set()
    triples = []
    for n in range(count):
        scene = draw_scene(bench, rng, "train", used, task="text triples")
        style = random_style(rng, len(scene.objects))
        sentence = style.render(scene.objects)
        positive = sentence
        # A scene has at least 8 wordings, so a different one turns up quickly.
        while positive == sentence:
            positive = random_style(rng, len(scene.objects)).render(scene.objects)
        index, new = rng.choice(one_attribute_variants(scene))
        changed = list(scene.objects)
        changed[index] = new
        triples.append(
            {
                "id": f"tt:{n}",
                "sentence": sentence,
                "positive": positive,
                "hard_negative": style.render(changed),
            }
        )
    return triples


def image_captions(bench: BenchmarkBuilder, rng: random.Random, count: int) -> list[dict[str, Any]]:
    """`count` (image, caption) pairs; the caption is a random wording of the scene."""
    used: set[str] = set()
    pairs = []
    for n in range(count):
        scene = draw_scene(bench, rng, "train", used, task="image captions")
        image = bench.scene_image("pairs_images", scene)
        pairs.append({"id": f"ic:{n}", "image_path": image, "caption": paraphrase(scene, rng)})
    return pairs
