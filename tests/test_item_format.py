"""One item format per model: written by training and by ``jfe convert``, read by
``embedder_for``; a plain Hugging Face directory is fed at its own processor's settings."""

import dataclasses
import importlib.util
import json
import logging
import os
import shutil

import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic
from PIL import Image

from jfe_jax.cli import main
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.encoder import embedder_for
from jfe_jax.index.embedder import Item
from jfe_jax.index.export import load_embeddings
from jfe_jax.index.identity import check_index_model
from jfe_jax.models.sizes import get_size
from jfe_jax.workdir import ITEM_FORMAT_FILE

TASK = "mscoco_task0"
POOL = "mbeir_mscoco_task0_test_cand_pool"
PROMPT = "Describe it in one word:"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_bench(tmp_path_factory.mktemp("format") / "bench", small_synthetic((TASK,)))


def _format_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("item format from")]


def _train_with_other_settings(bench: str, workdir: str) -> None:
    """One step of ``jfe train``'s trainer on a config whose data settings are all changed
    (toy batches stand in for the pipeline; the workdir records the config's settings), then
    the tokenizer copied in as the data pipeline does."""
    from train_fixtures import ToyPairs

    from jfe_jax.train.config_base import base_config
    from jfe_jax.train.trainer import train

    c = base_config()
    c.data.root = bench
    c.data.global_batch_size = 8
    c.data.prompt = PROMPT
    c.data.length_buckets = (80, 160)
    c.data.max_length = 160
    c.data.query_patch_budget = 32
    c.data.candidate_patch_budget = 48
    c.data.image_max_pixels = 56 * 56 * 2  # the 112x112 images are scaled down to 84x56
    c.data.image_min_pixels = 28 * 28
    c.optimizer.warmup_steps = 0
    c.train.num_steps = 1
    c.train.checkpoint_every_steps = 1
    c.train.async_checkpointing = False
    train(c, workdir, data=ToyPairs(get_size("tiny"), batch_size=8))
    shutil.copytree(os.path.join(bench, "tokenizer"), os.path.join(workdir, "tokenizer"))


def test_converted_model_evaluates_exactly_as_its_workdir_and_loads_in_transformers(
    bench, tmp_path, caplog
):
    workdir, converted = str(tmp_path / "run"), str(tmp_path / "converted")
    _train_with_other_settings(bench, workdir)
    trained = ItemFormat.load(workdir)
    assert (trained.prompt, trained.length_buckets, trained.max_length) == (PROMPT, (80, 160), 160)
    assert (trained.query_patch_budget, trained.candidate_patch_budget) == (32, 48)
    assert (trained.min_pixels, trained.max_pixels) == (28 * 28, 56 * 56 * 2)

    assert main(["convert", "--src", workdir, "--dst", converted]) == 0
    assert ItemFormat.load(converted) == trained
    results = {}
    for name, model in (("workdir", workdir), ("converted", converted)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="jfe_jax.index.embedder"):
            out = str(tmp_path / f"eval_{name}")
            assert main(["eval", "--model", model, "--mbeir-root", bench, "--out", out]) == 0
        (line,) = _format_lines(caplog)  # one line says which settings, from where
        assert line.startswith(f"item format from {os.path.join(model, ITEM_FORMAT_FILE)}: ")
        assert repr(PROMPT) in line and "32 per query row, 48 per candidate row" in line
        assert "pixels 784..6272" in line
        with open(os.path.join(out, "results.json")) as f:
            results[name] = json.load(f)
    workdir_eval, converted_eval = results["workdir"], results["converted"]
    assert converted_eval["tasks"] == workdir_eval["tasks"]
    assert converted_eval["item_format_hash"] == workdir_eval["item_format_hash"]
    for name in ("workdir", "converted"):
        assert results[name]["item_format"]["prompt"] == PROMPT
    # Bit for bit: the pool's embeddings and every run's ids and scores.
    pools = [
        load_embeddings(str(tmp_path / f"eval_{name}" / "embeddings" / POOL))
        for name in ("workdir", "converted")
    ]
    np.testing.assert_array_equal(pools[0][0], pools[1][0])
    assert pools[0][1] == pools[1][1]
    runs = sorted(os.listdir(tmp_path / "eval_workdir" / "runs"))
    assert runs
    for run in runs:
        a = (tmp_path / "eval_workdir" / "runs" / run).read_bytes()
        assert a == (tmp_path / "eval_converted" / "runs" / run).read_bytes()

    # transformers loads the directory: the model class, and the processor's parts with the
    # trained pixel limits.
    pytest.importorskip("torch")
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    _, info = Qwen2VLForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(converted)
        image_processor, tokenizer = processor.image_processor, processor.tokenizer
    else:
        # Qwen2VLProcessor also builds a video processor, which needs torchvision (not
        # installable here next to the CPU torch): load the two parts AutoProcessor loads.
        image_processor = AutoImageProcessor.from_pretrained(converted)
        tokenizer = AutoTokenizer.from_pretrained(converted)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (
        28 * 28,
        56 * 56 * 2,
    )
    assert tokenizer("a red circle")["input_ids"]


def test_transformers_directory_is_embedded_at_its_preprocessor_pixel_limits(
    bench, tmp_path, caplog
):
    pytest.importorskip("torch")
    from hf_reference import build_hf_model
    from transformers import Qwen2VLImageProcessorPil

    model = tmp_path / "qwen2vl"
    build_hf_model(get_size("tiny"), seed=4).save_pretrained(model)
    hf_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 6)
    hf_processor.save_pretrained(model)
    for name in os.listdir(os.path.join(bench, "tokenizer")):
        shutil.copy(os.path.join(bench, "tokenizer", name), model)
    assert not (model / ITEM_FORMAT_FILE).exists()

    with caplog.at_level(logging.INFO, logger="jfe_jax.index.embedder"):
        embedder = embedder_for(str(model), image_root=str(tmp_path))
    (line,) = _format_lines(caplog)
    assert line.startswith(f"item format from {model / 'preprocessor_config.json'} ")
    f = embedder.format
    assert (f.min_pixels, f.max_pixels) == (28 * 28, 28 * 28 * 6)  # not the demo's 112x112
    assert f.patch_budget == 32  # 4704 pixels / 14**2 = 24 patches, rounded up to 16s

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 140, 3), np.uint8))
    image.save(tmp_path / "big.png")
    ours = embedder.process(Item(text="a red circle", image="big.png"))
    theirs = hf_processor(images=[image], return_tensors="np")
    np.testing.assert_array_equal(ours.image_grid_thw, theirs["image_grid_thw"])
    np.testing.assert_allclose(ours.pixel_values, theirs["pixel_values"], atol=1e-6, rtol=0)
    assert embedder.embed([Item(text="a red circle", image="big.png")]).shape == (1, embedder.dim)


def test_format_precedence_budgets_and_mismatch(tmp_path):
    vision = get_size("tiny").vision
    # Qwen2-VL-2B's processor allows 12.8M pixels: the budget is what one item can hold.
    big = ItemFormat.for_vision(vision, max_pixels=12845056, length_buckets=(64, 128))
    assert big.patch_budget == 128 * 4
    default, origin = ItemFormat.of_model(str(tmp_path), vision)
    assert default == ItemFormat.for_vision(vision) and origin.startswith("Qwen2-VL processor")
    assert (default.min_pixels, default.max_pixels) == (56 * 56, 28 * 28 * 1280)

    # A workdir from before jfe_item_format.json: its training config.
    from jfe_jax.train.config_base import base_config

    old_run = tmp_path / "old_run"
    (old_run / "checkpoints").mkdir(parents=True)
    config = base_config()
    config.model.fusion, config.data.prompt = "late", PROMPT
    (old_run / "config.json").write_text(config.to_json_best_effort())
    found, origin = ItemFormat.of_model(str(old_run), vision)
    assert (found.fusion, found.prompt, found.max_length) == ("late", PROMPT, 256)
    assert origin.endswith("config.json (training config)")

    trained = ItemFormat.for_vision(vision, prompt=PROMPT, max_pixels=6272)
    trained.save(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 9999}))
    assert ItemFormat.of_model(str(tmp_path), vision)[0] == trained  # the file wins
    with pytest.raises(ValueError, match="item format has patch_size=14 but .* has patch_size=16"):
        ItemFormat.of_model(str(tmp_path), dataclasses.replace(vision, patch_size=16))
    with pytest.raises(ValueError, match="unknown fields"):
        ItemFormat.from_dict({**trained.to_dict(), "colour": "red"})

    # An index built under one format, searched under another: both named.
    built = {"model_fingerprint": "f" * 64, "item_format_hash": "a" * 64}
    searching = {"model_fingerprint": "f" * 64, "item_format_hash": "b" * 64}
    built["item_format"] = trained.identity()
    searching["item_format"] = ItemFormat.for_vision(vision, max_pixels=12544).identity()
    with pytest.raises(ValueError) as error:
        check_index_model({"user": built}, searching, "idx", this="--model has")
    message = str(error.value)
    assert "with item format aaaaaaaaaaaa, --model has bbbbbbbbbbbb" in message
    assert "max_pixels: 6272 vs 12544" in message and f'prompt: "{PROMPT}" vs "Summ' in message


def test_a_run_with_text_only_queries_saves_and_reloads_a_text_only_query_budget(tmp_path):
    from jfe_jax.train.config_base import demo_stage2_config

    config = demo_stage2_config()
    config.data.query_patch_budget = 0  # text-only queries, as the config field documents
    vision = get_size("tiny").vision
    # What the trainer writes into its workdir, then what export and eval read back.
    ItemFormat.from_train_config(config, vision).save(str(tmp_path))
    loaded = ItemFormat.load(str(tmp_path))
    assert loaded.query_patch_budget == 0
    assert loaded.candidate_patch_budget == config.data.candidate_patch_budget
    # Left unset, a budget is still derived from max_pixels.
    assert ItemFormat.for_vision(vision).query_patch_budget > 0
