"""``Encoder.encode``: the one-call API, equal to the lower-level path (``embedder_for`` +
``Item``s), on the model's own item format."""

import dataclasses
import os
import re
import shutil

import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic
from PIL import Image

from jfe_jax import Encoder
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.data.processing import DEFAULT_EMBED_PROMPT
from jfe_jax.encoder import embedder_for
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.models.sizes import get_size

PROMPT = "Describe it in one word:"
INSTRUCTION = "Retrieve the answer to the question about the image."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model saved as training saves one, with an item format that differs from the
    defaults in its prompt, pixel limits, budgets and length buckets."""
    root = tmp_path_factory.mktemp("encode")
    bench = make_bench(root / "bench", small_synthetic(("mscoco_task0",)))
    encoder = Encoder.init(get_size("tiny"), seed=3)
    item_format = ItemFormat.for_vision(
        encoder.config.vision,
        prompt=PROMPT,
        max_pixels=56 * 56 * 2,
        min_pixels=28 * 28,
        length_buckets=(80, 160),
        max_length=160,
    )
    assert item_format != ItemFormat.for_vision(encoder.config.vision)
    directory = str(root / "model")
    encoder.save_pretrained(directory, item_format=item_format)
    for name in os.listdir(os.path.join(bench, "tokenizer")):
        shutil.copy(os.path.join(bench, "tokenizer", name), directory)
    return directory


def _images(directory) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(112, 112), (84, 140), (100, 60)]):
        path = os.path.join(directory, f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_encode_equals_the_item_path_on_the_models_own_format(model_dir, tmp_path):
    enc = Encoder.from_pretrained(model_dir)
    lower = embedder_for(enc, batch_size=8)
    assert lower.format.prompt == PROMPT and lower.format.max_pixels == 56 * 56 * 2
    texts = ["a dog on a beach", "two cats", "a red bus in the rain"]
    paths = _images(tmp_path)
    pil = [Image.open(p) for p in paths]
    arrays = [np.asarray(Image.open(p)) for p in paths]

    by_text = enc.encode(texts)  # a plain list of strings
    np.testing.assert_allclose(by_text, lower.embed([Item(t) for t in texts]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(by_text, axis=1), 1.0, atol=1e-5)
    assert by_text.shape == (3, lower.dim) and by_text.dtype == np.float32

    by_image = enc.encode(images=pil)
    np.testing.assert_allclose(by_image, lower.embed([Item(image=p) for p in paths]), atol=1e-6)
    np.testing.assert_allclose(enc.encode(images=paths), by_image, atol=1e-6)
    np.testing.assert_allclose(enc.encode(images=arrays), by_image, atol=1e-6)

    questions = ["What colour is it?", "How many are there?", "Where is it?"]
    pairs = enc.encode(texts=questions, images=paths, instruction=INSTRUCTION)
    expected = lower.embed([Item(q, p, INSTRUCTION) for q, p in zip(questions, paths)])
    np.testing.assert_allclose(pairs, expected, atol=1e-6)
    per_item = enc.encode(texts=questions, images=paths, instruction=[INSTRUCTION, None, "x"])
    np.testing.assert_allclose(per_item[0], pairs[0], atol=1e-6)
    assert not np.allclose(per_item[1], pairs[1], atol=1e-4)
    # A single string is a list of one.
    np.testing.assert_allclose(enc.encode("two cats")[0], by_text[1], atol=1e-6)

    # The model's format is what makes these embeddings: the default prompt gives others.
    default = ItemEmbedder(enc, lower.format, batch_size=8, prompt=DEFAULT_EMBED_PROMPT)
    assert not np.allclose(default.embed([Item(t) for t in texts]), by_text, atol=1e-3)
    # One embedder, built once and reused.
    assert len(enc._embedders) == 1


def test_encode_rejects_what_it_cannot_pair(model_dir):
    enc = Encoder.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="2 texts and 1 images"):
        enc.encode(texts=["a", "b"], images=[np.zeros((56, 56, 3), np.uint8)])
    with pytest.raises(ValueError, match="needs texts"):
        enc.encode()
    with pytest.raises(ValueError, match="empty"):
        enc.encode(texts=[])
    with pytest.raises(ValueError, match="1 instructions for 2 items"):
        enc.encode(texts=["a", "b"], instruction=["x"])
    with pytest.raises(ValueError, match="must be a list"):
        enc.encode(texts={"a"})
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 0$"):
        enc.encode(texts=["a"], batch_size=0)


def test_encoder_built_in_memory_says_it_has_no_tokenizer_and_takes_one(model_dir):
    enc = Encoder.init(get_size("tiny"), seed=3)
    with pytest.raises(ValueError, match=r"built in memory \(Encoder.init.*tokenizer=DIR"):
        enc.encode(texts=["a dog"])
    loaded = Encoder.from_pretrained(model_dir)  # the same weights, its tokenizer beside them
    got = enc.encode(texts=["a dog"], tokenizer=model_dir, prompt=PROMPT, max_pixels=56 * 56 * 2)
    np.testing.assert_allclose(got, loaded.encode(texts=["a dog"]), atol=1e-6)


def test_public_names():
    import jfe_jax

    assert {"Encoder", "Index"} <= set(jfe_jax.__all__)
    assert dataclasses.is_dataclass(jfe_jax.EncoderOptions)


def _readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_python_api_runs_as_written(model_dir, tmp_path, monkeypatch):
    """The README's code, unchanged, in a directory laid out as it assumes: the model where
    `make demo` leaves one, and the two photos it names."""
    blocks = _readme_python_blocks()
    assert len(blocks) == 2 and blocks[0].startswith("from jfe_jax import Encoder, Index\n")
    monkeypatch.chdir(tmp_path)
    os.makedirs("workdir/demo")
    os.symlink(model_dir, "workdir/demo/stage2")
    os.makedirs("photos")
    rng = np.random.default_rng(1)
    for name, size in (("bus", (120, 90)), ("dogs", (90, 120))):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f"photos/{name}.jpg")

    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)

    dim = namespace["texts"].shape[1]
    assert namespace["images"].shape == (2, dim) and namespace["answer"].shape == (1, dim)
    assert namespace["ids"].shape == (2, 1) and set(namespace["ids"][:, 0]) <= {"bus", "dogs"}
    assert namespace["Index"].load("photos_index").size == 2
    np.testing.assert_allclose(namespace["same"][0], namespace["texts"][0], atol=1e-6)
    np.testing.assert_allclose(namespace["same"][1], namespace["images"][0], atol=1e-6)
    enc = namespace["enc"]
    pair = enc.encode(texts=["a red double-decker bus"], images=["photos/bus.jpg"])
    np.testing.assert_allclose(namespace["emb"], pair, atol=2e-5)
    assert namespace["hidden"].shape[:2] == namespace["ids_"].shape
    assert os.path.isfile("exported/jfe-model/config.json")
