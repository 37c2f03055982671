"""Model fingerprints, and caches and indexes that are never reused for another model."""

import dataclasses
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic, tiny_model
from flax import traverse_util

from jfe_jax.cli import main
from jfe_jax.encoder import Encoder, embedder_for
from jfe_jax.index.embedder import Item
from jfe_jax.index.export import IDENTITY_FILE, export_embeddings, load_embeddings
from jfe_jax.models import fingerprint as fingerprint_lib
from jfe_jax.models.fingerprint import is_current_form, short
from jfe_jax.models.one_tower import EncoderOptions
from jfe_jax.models.safetensors_io import SINGLE_FILE, SafetensorsFile, _write_file
from jfe_jax.models.sizes import get_size
from jfe_jax.train.checkpoint import Checkpointer
from jfe_jax.train.config_base import base_config
from jfe_jax.workdir import FINGERPRINT_FILE, MODEL_CONFIG_FILE

TASK = "mscoco_task0"
POOL = "mbeir_mscoco_task0_test_cand_pool"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small benchmark and two tiny models (seeds 2 and 9) with its tokenizer."""
    base = tmp_path_factory.mktemp("fp")
    root = make_bench(base / "bench", small_synthetic((TASK, "webqa_task1")))
    models = {
        name: tiny_model(base / f"model_{name}", root, seed) for name, seed in (("a", 2), ("b", 9))
    }
    return root, models, base


def _error_line(capsys) -> str:
    """The one line a failed command printed on stderr, beside progress bars and jfe-jax's
    INFO log lines."""
    err = capsys.readouterr().err.strip()
    progress = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed time
    info = re.compile(r"^[\d-]+ [\d:,]+ INFO \[jfe_jax\.")
    lines = [
        line for line in err.splitlines() if not progress.search(line) and not info.match(line)
    ]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ fingerprints


def test_moved_model_keeps_its_fingerprint_and_another_model_differs(setup, tmp_path):
    _, models, _ = setup
    moved = shutil.copytree(models["a"], tmp_path / "moved")
    a = Encoder.from_pretrained(models["a"])
    assert Encoder.from_pretrained(str(moved)).fingerprint == a.fingerprint
    assert Encoder.from_pretrained(models["b"]).fingerprint != a.fingerprint
    assert re.fullmatch(r"w2-[0-9a-f]{64}", a.fingerprint) and a.fingerprint is a.fingerprint


def test_in_memory_fingerprint_hashes_params_and_output_options():
    config = get_size("tiny")
    a = Encoder.init(config, seed=2)
    copy = jax.tree_util.tree_map(jnp.array, a.params)
    assert Encoder(config, copy, a.options).fingerprint == a.fingerprint
    other = jax.tree_util.tree_map(lambda x: x * 0.5, a.params)
    assert Encoder(config, other, a.options).fingerprint != a.fingerprint
    bf16 = Encoder(config, a.params, dataclasses.replace(a.options, dtype="bfloat16"))
    assert bf16.fingerprint != a.fingerprint
    layout = Encoder(config, a.params, dataclasses.replace(a.options, remat="full"))
    assert layout.fingerprint == a.fingerprint  # remat changes memory, not outputs
    a.params = other  # replaced params are hashed again
    assert a.fingerprint != layout.fingerprint


def _save_workdir(workdir, params_by_step, config=None):
    """A training workdir as the trainer writes it, with the given params at each step."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write((config or base_config()).to_json_best_effort())
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(get_size("tiny").to_hf_dict(), f)
    checkpointer = Checkpointer(
        str(workdir), every_steps=1, every_seconds=1e9, keep=5, asynchronous=False
    )
    for step, params in params_by_step.items():
        state = {
            "step": jnp.asarray(step),
            "trainable": {k: v for k, v in params.items() if k != "vision"},
            "frozen": {"vision": params["vision"]},
        }
        checkpointer.save(step, state, data_state={"position": step}, config={})
    checkpointer.close()


def test_workdir_fingerprint_follows_the_checkpoint_not_the_path(tmp_path):
    p1 = Encoder.init(get_size("tiny"), seed=2).params
    p2 = jax.tree_util.tree_map(lambda x: x * 0.5, p1)  # "more training"
    _save_workdir(tmp_path / "run", {1: p1, 2: p2})
    step1 = Encoder.from_workdir(str(tmp_path / "run"), step=1)
    step2 = Encoder.from_workdir(str(tmp_path / "run"), step=2)
    assert step1.step == 1 and step2.step == 2
    assert step1.fingerprint != step2.fingerprint
    moved = shutil.move(tmp_path / "run", tmp_path / "moved")
    assert Encoder.from_pretrained(str(moved)).fingerprint == step2.fingerprint
    # A run retrained to the same step with other weights is another model.
    _save_workdir(tmp_path / "rerun", {1: p2})
    assert Encoder.from_workdir(str(tmp_path / "rerun"), step=1).fingerprint != step1.fingerprint
    flat = traverse_util.flatten_dict(jax.device_get(step2.params))
    for key, value in traverse_util.flatten_dict(jax.device_get(p2)).items():
        np.testing.assert_array_equal(flat[key], value)


def test_converted_directory_has_its_workdirs_fingerprint(tmp_path, monkeypatch):
    params = Encoder.init(get_size("tiny"), seed=3).params
    _save_workdir(tmp_path / "run", {1: params})
    workdir = Encoder.from_workdir(str(tmp_path / "run"))
    workdir.save_pretrained(str(tmp_path / "converted"))
    converted = Encoder.from_pretrained(str(tmp_path / "converted"))
    assert converted.fingerprint == workdir.fingerprint
    # Stored beside the weights and read back: nothing is hashed again.
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "1" / FINGERPRINT_FILE)
    assert os.path.isfile(tmp_path / "converted" / FINGERPRINT_FILE)

    def no_rehash(*args, **kwargs):
        raise AssertionError("the stored fingerprint was not used")

    monkeypatch.setattr(fingerprint_lib, "hash_canonical_params", no_rehash)
    for again in (
        Encoder.from_workdir(str(tmp_path / "run")),
        Encoder.from_pretrained(str(tmp_path / "converted")),
    ):
        assert again.fingerprint == workdir.fingerprint


def test_scanned_lora_model_and_its_merged_conversion_agree(tmp_path):
    config = get_size("tiny")
    options = EncoderOptions(scan_layers=True, lora_rank=4, lora_alpha=8.0)
    params = Encoder.init(config, options, seed=5).params
    # Non-zero adapters, so that merging them changes the kernels.
    flat = traverse_util.flatten_dict(jax.device_get(params))
    rng = np.random.default_rng(0)
    for key, value in flat.items():
        if key[-1] == "lora_b":
            flat[key] = rng.normal(size=value.shape).astype(value.dtype)
    lora = Encoder(config, traverse_util.unflatten_dict(flat), options)
    lora.save_pretrained(str(tmp_path / "merged"))
    merged = Encoder.from_pretrained(str(tmp_path / "merged"), scan_layers=False)
    assert merged.options.lora_rank == 0 and not merged.options.scan_layers
    assert merged.fingerprint == lora.fingerprint
    plain = Encoder(config, params, options)  # the same kernels, zero adapters: another model
    assert plain.fingerprint != lora.fingerprint


def test_a_changed_weight_in_a_converted_directory_changes_its_fingerprint(setup, tmp_path):
    _, models, _ = setup
    copy = str(shutil.copytree(models["a"], tmp_path / "copy"))
    before = Encoder.from_pretrained(copy).fingerprint
    assert Encoder.from_pretrained(copy).fingerprint == before  # read back
    path = os.path.join(copy, SINGLE_FILE)
    weights = SafetensorsFile(path)
    tensors = {name: np.array(weights.get(name)) for name in weights.keys()}
    del weights
    tensors["model.norm.weight"][0] += 1.0
    _write_file(path, tensors)
    assert Encoder.from_pretrained(copy).fingerprint != before


def test_converted_model_searches_its_workdirs_index(setup, capsys, tmp_path):
    root, _, _ = setup
    config = base_config()
    config.data.image_max_pixels = 112 * 112  # small images: a fast export
    config.data.candidate_patch_budget = config.data.query_patch_budget = 64
    workdir = tmp_path / "run"
    _save_workdir(workdir, {1: Encoder.init(get_size("tiny"), seed=6).params}, config)
    shutil.copytree(os.path.join(root, "tokenizer"), workdir / "tokenizer")
    pool, index = str(tmp_path / "pool"), str(tmp_path / "index")
    args = ["--mbeir-root", root, "--pool", TASK, "--out", pool]
    assert main(["export", "--model", str(workdir), *args]) == 0
    assert main(["index", "build", "--embeddings", pool, "--out", index]) == 0
    converted = str(tmp_path / "converted")
    assert main(["convert", "--src", str(workdir), "--dst", converted]) == 0
    query = ["--index", index, "--text", "a red circle", "-k", "3", "--json"]
    capsys.readouterr()
    assert main(["search", "--model", str(workdir), *query]) == 0
    from_workdir = json.loads(capsys.readouterr().out)["hits"]
    assert main(["search", "--model", converted, *query]) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == from_workdir


def test_index_of_an_older_fingerprint_form_is_refused(setup, capsys):
    root, models, base = setup
    pool, index = str(base / "old_form_pool"), str(base / "old_form_index")
    args = ["--mbeir-root", root, "--pool", TASK, "--out", pool]
    assert main(["export", "--model", models["a"], *args]) == 0
    assert main(["index", "build", "--embeddings", pool, "--out", index]) == 0
    meta_path = os.path.join(index, "index_metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    assert is_current_form(meta["user"]["model_fingerprint"])
    meta["user"]["model_fingerprint"] = "ab" * 32  # as jfe-jax wrote them before: file hashes
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    capsys.readouterr()
    assert main(["search", "--model", models["a"], "--index", index, "--text", "x"]) == 2
    line = _error_line(capsys)
    assert "built by an older jfe-jax" in line and "hashed the weight files" in line
    assert "rebuild it" in line


def test_item_format_names_what_the_model_is_fed(setup, tmp_path):
    _, models, _ = setup
    encoder = Encoder.from_pretrained(models["a"])
    plain = embedder_for(encoder)
    assert embedder_for(encoder, pack=True).item_format_hash == plain.item_format_hash
    other = embedder_for(encoder, prompt="In one word:")
    assert other.item_format_hash != plain.item_format_hash
    items = [(f"t{i}", Item(text=f"a red circle {i}")) for i in range(3)]
    out = str(tmp_path / "out")
    export_embeddings(plain, items, out, progress=False)
    # The error names both formats: their hashes and the differing fields' values.
    both = r'with item format \w+, this is \w+ \(they differ in prompt: "Summarize.*" vs "In one'
    with pytest.raises(ValueError, match=both):
        export_embeddings(other, items, out, progress=False, overwrite=False)
    assert export_embeddings(plain, items, out, progress=False)["resumed_shards"] == [0]
    renamed = [(f"u{i}", item) for i, (_, item) in enumerate(items)]
    with pytest.raises(ValueError, match="shard-00000 holds other ids than the stream"):
        export_embeddings(plain, renamed, out, progress=False, overwrite=False)


# ------------------------------------------------------------------------------ caches


def test_export_over_another_models_export_is_rebuilt_or_refused(setup, capsys, caplog):
    root, models, base = setup
    common = ["--mbeir-root", root, "--pool", TASK, "--shard-size", "4"]
    fresh, reused = str(base / "export_fresh_b"), str(base / "export_reused")
    assert main(["export", "--model", models["b"], *common, "--out", fresh]) == 0
    assert main(["export", "--model", models["a"], *common, "--out", reused]) == 0
    a_fp = load_embeddings(reused)[2]["model_fingerprint"]
    b_fp = load_embeddings(fresh)[2]["model_fingerprint"]
    # Another model's shards, some of them missing (an export that was cut short).
    os.remove(os.path.join(reused, "metadata-host000.json"))
    shutil.rmtree(os.path.join(reused, "shard-00001"))
    capsys.readouterr()
    args = ["export", "--model", models["b"], *common, "--out", reused]
    assert main([*args, "--no-overwrite"]) == 2
    err = _error_line(capsys)
    assert (
        f"was made by model fingerprint {short(a_fp)} ({models['a']}), this is {short(b_fp)}" in err
    )
    assert "rerun without --no-overwrite" in err
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert "removing" in caplog.text and short(a_fp) in caplog.text
    assert "reused 0" in capsys.readouterr().out  # nothing of model a was reused
    want, want_ids, _ = load_embeddings(fresh)
    got, got_ids, meta = load_embeddings(reused)
    assert got_ids == want_ids and meta["model_fingerprint"] == b_fp
    np.testing.assert_array_equal(got, want)
    assert main(args) == 0  # the same model again: every shard reused
    assert f"wrote 0, reused {meta['num_shards']}" in capsys.readouterr().out
    assert meta["num_shards"] > 2


def test_export_without_fingerprint_is_stale(setup, capsys):
    root, models, base = setup
    out = str(base / "export_old")
    args = ["export", "--model", models["a"], "--mbeir-root", root, "--pool", TASK, "--out", out]
    assert main(args) == 0
    # An export written before fingerprints: no identity in its shards or metadata.
    os.remove(os.path.join(out, "shard-00000", IDENTITY_FILE))
    meta_path = os.path.join(out, "metadata-host000.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["model_fingerprint"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    capsys.readouterr()
    with pytest.raises(ValueError, match="has no model fingerprint"):
        load_embeddings(out)
    assert main(["index", "build", "--embeddings", out, "--out", str(base / "old_index")]) == 2
    assert "rerun jfe export into it" in _error_line(capsys)
    assert main([*args, "--no-overwrite"]) == 2
    assert "without a model fingerprint" in _error_line(capsys)
    assert main(args) == 0
    assert load_embeddings(out)[2]["model_fingerprint"]


def _read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_eval_over_another_models_cache_recomputes_it(setup, capsys):
    root, models, base = setup
    common = ["--mbeir-root", root, "--tasks", TASK]
    fresh, reused = str(base / "eval_fresh_b"), str(base / "eval_reused")
    assert main(["eval", "--model", models["b"], *common, "--out", fresh]) == 0
    assert main(["eval", "--model", models["a"], *common, "--out", reused]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", models["b"], *common, "--out", reused, "--no-overwrite"]) == 2
    assert "was made by model fingerprint" in _error_line(capsys)
    assert main(["eval", "--model", models["b"], *common, "--out", reused]) == 0
    want, got = _read_results(fresh), _read_results(reused)
    assert got["model_fingerprint"] == want["model_fingerprint"]
    assert got["tasks"] == want["tasks"] and got["details"] == want["details"]
    want_emb = load_embeddings(os.path.join(fresh, "embeddings", POOL))[0]
    np.testing.assert_array_equal(
        load_embeddings(os.path.join(reused, "embeddings", POOL))[0], want_emb
    )
    index_meta = os.path.join(reused, "index", POOL, "index_metadata.json")
    with open(index_meta) as f:
        assert json.load(f)["user"]["model_fingerprint"] == want["model_fingerprint"]


# ------------------------------------------------------------------------------ indexes


def test_search_refuses_another_models_index_and_accepts_the_moved_model(setup, capsys, tmp_path):
    root, models, base = setup
    pool, index = str(base / "search_pool"), str(base / "search_index")
    assert (
        main(
            ["export", "--model", models["a"], "--mbeir-root", root, "--pool", TASK, "--out", pool]
        )
        == 0
    )
    assert main(["index", "build", "--embeddings", pool, "--out", index]) == 0
    a_fp = load_embeddings(pool)[2]["model_fingerprint"]
    query = ["--index", index, "--text", "a red circle", "-k", "3", "--json"]
    capsys.readouterr()
    assert main(["search", "--model", models["b"], *query]) == 2
    err = _error_line(capsys)
    assert f"made by model fingerprint {short(a_fp)} ({models['a']}), --model has" in err
    assert "was this index built by another model" in err
    moved = str(shutil.copytree(models["a"], tmp_path / "moved_a"))
    assert main(["search", "--model", moved, *query]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3

    queries_b = str(base / "search_queries_b")
    assert (
        main(
            [
                "export",
                "--model",
                models["b"],
                "--mbeir-root",
                root,
                "--queries",
                TASK,
                "--out",
                queries_b,
            ]
        )
        == 0
    )
    capsys.readouterr()
    hits = str(tmp_path / "hits.jsonl")
    assert main(["index", "search", "--index", index, "--queries", queries_b, "--out", hits]) == 2
    assert "the queries' export has" in _error_line(capsys)

    # An index built before fingerprints cannot be matched to a model: rebuild it.
    with open(os.path.join(index, "index_metadata.json")) as f:
        meta = json.load(f)
    del meta["user"]["model_fingerprint"]
    with open(os.path.join(index, "index_metadata.json"), "w") as f:
        json.dump(meta, f)
    assert main(["search", "--model", models["a"], *query]) == 2
    assert "has no model fingerprint" in _error_line(capsys)
