"""Expected failures of the ``jfe`` command: one line naming the path and cause, exit code 2.

Each case here used to end in a traceback (or hundreds of lines of them). ``--debug`` and
``JFE_DEBUG=1`` bring the traceback back.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from bench_fixtures import make_bench, small_synthetic, tiny_model

from jfe_jax.cli import EXIT_ERROR, main
from jfe_jax.errors import describe_error
from jfe_jax.index.export import load_embeddings
from jfe_jax.models.sizes import get_size
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train.config_base import base_config
from jfe_jax.train.trainer import train

SMALL = small_synthetic(("mscoco_task0",), test_queries_per_task=4)


def error_line(capsys, command: str) -> str:
    """The one line a failed command printed on stderr (beside progress bars and jfe-jax's
    INFO log lines, nothing)."""
    err = capsys.readouterr().err
    progress = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed time
    info = re.compile(r"^[\d-]+ [\d:,]+ INFO \[jfe_jax\.")
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not progress.search(line) and not info.match(line)
    ]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jfe {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``bench`` (data), ``model`` (tiny HF dir with tokenizer), ``index`` of its pool."""
    base = tmp_path_factory.mktemp("errors")
    root = make_bench(base / "bench", SMALL)
    model, index = tiny_model(base / "model", root, seed=4), str(base / "index")
    pool = str(base / "pool")
    common = ["--model", model, "--mbeir-root", root]
    assert main(["export", *common, "--pool", "mscoco_task0", "--out", pool]) == 0
    assert main(["index", "build", "--embeddings", pool, "--out", index]) == 0
    return base


def _run(*command: str) -> str | None:
    """None when ``command`` succeeded, else why not."""
    try:
        done = subprocess.run(command, capture_output=True)
    except OSError as e:
        return str(e)
    return None if done.returncode == 0 else done.stderr.decode().strip()


@contextlib.contextmanager
def read_only(path):
    """``path`` made unwritable, for root too, which ignores permission bits: the immutable
    flag (``chattr +i``), or where the file system has none a read-only tmpfs mounted on it."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    why = _run("chattr", "+i", str(path))
    undo = ("chattr", "-i", str(path))
    if why is not None:
        mount = _run("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path))
        if mount is not None:
            pytest.fail(f"cannot make {path} read-only as root: {why}; {mount}")
        undo = ("umount", str(path))
    try:
        yield
    finally:
        assert _run(*undo) is None


def test_missing_inputs_of_search_are_one_line(world, capsys):
    model, index = str(world / "model"), str(world / "index")
    capsys.readouterr()
    missing = str(world / "no_such.png")
    assert main(["search", "--model", model, "--index", index, "--image", missing]) == EXIT_ERROR
    assert missing in error_line(capsys, "search")
    nowhere = str(world / "no_index")
    assert main(["search", "--model", model, "--index", nowhere, "--text", "x"]) == EXIT_ERROR
    assert nowhere in error_line(capsys, "search")


def test_missing_mbeir_root_pool_and_out_folder_are_one_line(world, capsys):
    model, root = str(world / "model"), str(world / "bench")
    capsys.readouterr()
    nowhere = str(world / "no_root")
    args = ["eval", "--model", model, "--mbeir-root", nowhere, "--out", str(world / "e")]
    assert main(args) == EXIT_ERROR
    assert nowhere in error_line(capsys, "eval")
    args = ["export", "--model", model, "--mbeir-root", root, "--pool", "nope_task9"]
    assert main([*args, "--out", str(world / "x")]) == EXIT_ERROR
    assert "nope_task9" in error_line(capsys, "export")
    queries = str(world / "q")
    assert (
        main(
            ["export", "--model", model, "--mbeir-root", root, "--queries", "mscoco_task0"]
            + ["--out", queries]
        )
        == 0
    )
    capsys.readouterr()
    out = str(world / "missing_folder" / "hits.jsonl")
    args = ["index", "search", "--index", str(world / "index"), "--queries", queries]
    assert main([*args, "--out", out]) == EXIT_ERROR
    assert out in error_line(capsys, "index")


def test_non_positive_counts_are_refused_in_one_line(world, capsys):
    model, root = str(world / "model"), str(world / "bench")
    capsys.readouterr()
    args = ["export", "--model", model, "--mbeir-root", root, "--pool", "mscoco_task0"]
    assert main([*args, "--out", str(world / "y"), "--shard-size", "0"]) == EXIT_ERROR
    line = error_line(capsys, "export")
    assert "--shard-size" in line and "at least 1" in line
    args = ["search", "--model", model, "--index", str(world / "index"), "--text", "x", "-k"]
    assert main([*args, "0"]) == EXIT_ERROR
    assert "-k" in error_line(capsys, "search")


def test_missing_image_during_eval_names_the_file(world, capsys, tmp_path):
    root = str(tmp_path / "bench")
    shutil.copytree(world / "bench", root)
    with open(
        os.path.join(root, "cand_pool", "local", "mbeir_mscoco_task0_test_cand_pool.jsonl")
    ) as f:
        image = next(json.loads(line)["img_path"] for line in f if json.loads(line)["img_path"])
    os.remove(os.path.join(root, image))
    capsys.readouterr()
    args = ["eval", "--model", str(world / "model"), "--mbeir-root", root]
    assert main([*args, "--out", str(tmp_path / "eval")]) == EXIT_ERROR
    assert image in error_line(capsys, "eval")


def test_config_file_missing_or_broken_is_one_line_with_its_line_number(tmp_path, capsys):
    capsys.readouterr()
    missing = str(tmp_path / "nope.py")
    assert main(["train", "--config", missing, "--workdir", str(tmp_path / "w")]) == EXIT_ERROR
    assert f"config file {missing} does not exist" in error_line(capsys, "train")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    assert main(["train", "--config", str(broken), "--workdir", str(tmp_path / "w")]) == 2
    assert f"{broken} line 1" in error_line(capsys, "train")
    failing = tmp_path / "failing.py"
    failing.write_text("def get_config():\n\n    return undefined_name\n")
    assert main(["train", "--config", str(failing), "--workdir", str(tmp_path / "w")]) == 2
    line = error_line(capsys, "train")
    assert f"{failing} line 3" in line and "NameError" in line


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "train", "--config", missing, "--workdir", str(tmp_path / "w")])
    monkeypatch.setenv("JFE_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main(["train", "--config", missing, "--workdir", str(tmp_path / "w")])


def test_read_only_workdir_is_one_line(tmp_path, capsys):
    config = tmp_path / "stage1.py"
    config.write_text(
        "from jfe_jax.train.config_base import demo_stage1_config\n\n"
        "def get_config():\n    c = demo_stage1_config()\n    c.lock()\n    return c\n"
    )
    locked = tmp_path / "locked"
    locked.mkdir()
    capsys.readouterr()
    with read_only(locked):
        args = ["train", "--config", str(config), "--workdir", str(locked / "run")]
        assert main([*args, f"--config.data.root={tmp_path}"]) == EXIT_ERROR
    line = error_line(capsys, "train")
    assert str(locked / "run") in line
    assert "permission denied" in line or "Read-only file system" in line  # chattr or mount


def toy_config(num_steps: int):
    c = base_config()
    c.data.global_batch_size = 8
    c.optimizer.warmup_steps = 0
    c.train.num_steps = num_steps
    c.train.checkpoint_every_steps = 1
    c.train.async_checkpointing = False
    c.lock()
    return c


def test_truncated_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    from train_fixtures import ToyPairs

    workdir = str(tmp_path / "run")
    train(toy_config(1), workdir, data=ToyPairs(get_size("tiny"), batch_size=8))
    state = os.path.join(ckpt.checkpoint_dir(workdir), "1", "state")
    # Every file cut short: inference restores only the parameters, and which data file holds
    # them (rather than the optimizer's moments) depends on the writer's layout.
    files = [os.path.join(d, f) for d, _, names in os.walk(state) for f in names]
    assert files
    for path in files:
        if os.path.getsize(path) > 100:
            with open(path, "r+b") as f:
                f.truncate(100)
    capsys.readouterr()
    assert main(["convert", "--src", workdir, "--dst", str(tmp_path / "out")]) == EXIT_ERROR
    line = error_line(capsys, "convert")
    assert f"checkpoint {ckpt.checkpoint_dir(workdir)}/1 cannot be read" in line


def test_full_disk_while_saving_is_one_line(tmp_path, capsys, monkeypatch):
    from train_fixtures import ToyPairs

    workdir = str(tmp_path / "run")
    target = f"{workdir}/checkpoints/1.orbax-checkpoint-tmp/state/_sharding"

    def full_disk(self, step, state, **kwargs):
        # How Orbax's writer (TensorStore) reports it, wrapped as in a failed async save.
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing local file "{target}": Failed to write 63074 '
            "bytes to file 11: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ckpt.Checkpointer, "save", full_disk)
    config = tmp_path / "toy.py"
    config.write_text(
        "from jfe_jax.train.config_base import base_config\n\n"
        "def get_config():\n    c = base_config()\n    c.data.global_batch_size = 8\n"
        "    c.optimizer.warmup_steps = 0\n    c.train.num_steps = 1\n    c.lock()\n"
        "    return c\n"
    )
    toy = ToyPairs(get_size("tiny"), batch_size=8)
    monkeypatch.setattr("jfe_jax.train.data.make_train_data", lambda *args: toy)
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--workdir", workdir]) == EXIT_ERROR
    line = error_line(capsys, "train")
    assert line == (
        f"jfe train: error: no space left on the device writing {target}; free some space and rerun"
    )


def test_describe_error_finds_a_full_disk_anywhere_in_the_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")
        except OSError as inner:
            raise RuntimeError("background save failed") from inner
    except RuntimeError as outer:
        assert describe_error(outer) == (
            "no space left on the device writing /w/metrics.jsonl; free some space and rerun"
        )
    assert describe_error(RuntimeError("a bug")) is None  # keeps its traceback


def test_truncated_safetensors_names_the_file_and_the_tensor(world, capsys, tmp_path):
    model = str(shutil.copytree(world / "model", tmp_path / "model"))
    weights = os.path.join(model, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 1000)  # a download cut short
    capsys.readouterr()
    assert main(["convert", "--src", model, "--dst", str(tmp_path / "out")]) == EXIT_ERROR
    line = error_line(capsys, "convert")
    assert re.search(rf"{re.escape(weights)} is truncated: tensor [\w.]+ needs data bytes", line)


def test_checkpoint_with_truncated_data_files_prints_one_line_and_no_traceback(tmp_path):
    import jax.numpy as jnp

    from jfe_jax.encoder import Encoder
    from jfe_jax.workdir import MODEL_CONFIG_FILE

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(base_config().to_json_best_effort())
    (workdir / MODEL_CONFIG_FILE).write_text(json.dumps(get_size("tiny").to_hf_dict()))
    params = Encoder.init(get_size("tiny"), seed=1).params
    checkpointer = ckpt.Checkpointer(
        str(workdir), every_steps=1, every_seconds=1e9, keep=1, asynchronous=False
    )
    state = {"step": jnp.asarray(1), "trainable": params, "frozen": {}}
    checkpointer.save(1, state, data_state={}, config={})
    checkpointer.close()
    # Only the array data cut short (manifests and metadata intact): the restore starts many
    # reads before one fails, and the others are abandoned unfinished.
    data = [
        os.path.join(d, f)
        for d, _, names in os.walk(workdir / "checkpoints" / "1" / "state")
        for f in names
        if os.path.basename(d) == "d" and os.path.getsize(os.path.join(d, f)) > 100
    ]
    assert data
    for path in data:
        os.truncate(path, 100)
    env = {**os.environ, "XLA_FLAGS": os.environ["JFE_TEST_COMPILE_FLAGS"]}
    command = [sys.executable, "-m", "jfe_jax.cli", "convert", "--src", str(workdir)]
    done = subprocess.run(
        [*command, "--dst", str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert done.returncode == EXIT_ERROR
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be read" in lines[0], done.stderr


@contextlib.contextmanager
def moved(path, to):
    """``path`` renamed to ``to`` for the block (a shared fixture's folder, put back after)."""
    os.rename(path, to)
    try:
        yield
    finally:
        os.rename(to, path)


def test_a_copied_index_searches_without_its_root_and_task_names_the_missing_root(
    world, tmp_path, capsys
):
    model, bench = str(world / "model"), str(world / "bench")
    index = str(tmp_path / "copy" / "index")
    shutil.copytree(world / "index", index)
    query = ["search", "--model", model, "--index", index, "--text", "a red circle", "--json"]
    capsys.readouterr()
    # The root moved beside the copy, where it was beside the original: found relative to it.
    with moved(bench, str(tmp_path / "copy" / "bench")):
        assert main([*query, "--task", "mscoco_task0", "-k", "2"]) == 0
        hits = json.loads(capsys.readouterr().out)["hits"]
        assert all(h["image"].startswith(str(tmp_path / "copy" / "bench")) for h in hits)
    # The root gone: the search needs none, a task's instruction does.
    with moved(bench, str(tmp_path / "gone")):
        assert main([*query, "-k", "2"]) == 0
        hits = json.loads(capsys.readouterr().out)["hits"]
        assert len(hits) == 2 and all("text" not in h for h in hits)
        assert main([*query, "--task", "mscoco_task0"]) == EXIT_ERROR
        line = error_line(capsys, "search")
    assert f"M-BEIR root of index {index}" in line and bench in line
    assert line.endswith("pass --mbeir-root DIR")


def _pool_copy(world, tmp_path, edit) -> tuple[str, str]:
    """(a copy of the benchmark whose mscoco_task0 test pool ``edit(lines)`` rewrote, that
    pool file)."""
    root = str(tmp_path / "bench")
    shutil.copytree(world / "bench", root)
    pool = os.path.join(root, "cand_pool", "local", "mbeir_mscoco_task0_test_cand_pool.jsonl")
    with open(pool) as f:
        lines = f.readlines()
    with open(pool, "w") as f:
        f.writelines(edit(lines))
    return root, pool


def test_a_duplicate_pool_id_names_the_pool_file_and_both_lines(world, tmp_path, capsys):
    root, pool = _pool_copy(world, tmp_path, lambda lines: [*lines, lines[1]])
    did = json.loads(open(pool).readlines()[1])["did"]
    capsys.readouterr()
    args = ["export", "--model", str(world / "model"), "--mbeir-root", root]
    assert main([*args, "--pool", "mscoco_task0", "--out", str(tmp_path / "x")]) == EXIT_ERROR
    lines = len(open(pool).readlines())
    assert error_line(capsys, "export") == (
        f"jfe export: error: {pool}: did {did!r} occurs on lines 2 and {lines}; expected each "
        "id once"
    )


def test_an_empty_pool_is_refused_naming_the_file(world, tmp_path, capsys):
    root, pool = _pool_copy(world, tmp_path, lambda lines: [])
    model = str(world / "model")
    capsys.readouterr()
    args = ["export", "--model", model, "--mbeir-root", root, "--pool", "mscoco_task0"]
    assert main([*args, "--out", str(tmp_path / "x")]) == EXIT_ERROR
    expected = f"pool {pool} holds no candidates; expected at least one"
    assert error_line(capsys, "export") == f"jfe export: error: {expected}"
    args = ["eval", "--model", model, "--mbeir-root", root, "--out", str(tmp_path / "e")]
    assert main(args) == EXIT_ERROR
    assert error_line(capsys, "eval") == f"jfe eval: error: {expected}"


def test_an_empty_export_is_refused_by_index_build_naming_it(world, tmp_path, capsys):
    from jfe_jax.index.pool import IDS_FILE

    export = str(tmp_path / "pool")
    shutil.copytree(world / "pool", export)
    (meta_file,) = [n for n in os.listdir(export) if n.startswith("metadata-host")]
    with open(os.path.join(export, meta_file)) as f:
        meta = json.load(f)
    assert os.path.isfile(os.path.join(export, "shard-00000", IDS_FILE))
    shutil.rmtree(os.path.join(export, "shard-00000"))  # an export of an empty pool: no shard
    meta.update(total_items=0, num_shards=0, shards=[])
    with open(os.path.join(export, meta_file), "w") as f:
        json.dump(meta, f)
    capsys.readouterr()
    args = ["index", "build", "--embeddings", export, "--out", str(tmp_path / "i")]
    assert main(args) == EXIT_ERROR
    line = error_line(capsys, "index")
    assert f"export {export} holds no embeddings of pool {meta['pool']}" in line


def test_an_over_long_query_names_the_truncate_text_flag_which_reaches_the_format(
    world, tmp_path, capsys
):
    model, index = str(world / "model"), str(world / "index")
    capsys.readouterr()
    long_text = " ".join(["circle"] * 3000)
    search = ["search", "--model", model, "--text", long_text, "--json"]
    assert main([*search, "--index", index]) == EXIT_ERROR
    line = error_line(capsys, "search")
    assert "pass --truncate-text to shorten the text" in line and "truncate_text=" not in line
    # With the flag the query is shortened, and the index (exported without it) accepts it:
    # truncation changes only items that would otherwise be refused.
    assert main([*search, "--index", index, "--truncate-text"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"]
    pool = str(tmp_path / "pool")
    args = ["--model", model, "--mbeir-root", str(world / "bench"), "--pool", "mscoco_task0"]
    assert main(["export", *args, "--out", pool, "--truncate-text"]) == 0
    assert "truncate_text" not in load_embeddings(pool)[2]["item_format"]  # not identity


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.data.global_batch_size=-4", "data.global_batch_size must be >= 1"),
        # ml_collections reads 5 as (5,): a bucket too short for the config's max_length.
        ("--config.data.length_buckets=5", "data.max_length=128 is longer than the largest of"),
        ("--config.data.length_buckets=(128,64)", "data.length_buckets=(128, 64): expected"),
    ],
)
def test_bad_config_value_fails_in_one_line_before_any_data_is_prepared(
    tmp_path, capsys, override, message
):
    config = tmp_path / "stage1.py"
    config.write_text(
        "from jfe_jax.train.config_base import demo_stage1_config\n\n"
        "def get_config():\n    c = demo_stage1_config()\n    c.lock()\n    return c\n"
    )
    workdir = tmp_path / "run"
    capsys.readouterr()
    args = ["train", "--config", str(config), "--workdir", str(workdir), override]
    assert main([*args, f"--config.data.root={tmp_path}"]) == EXIT_ERROR
    assert message in error_line(capsys, "train")
    assert not os.path.exists(workdir / "tfds")
