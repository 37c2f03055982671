"""The training-workdir layout is spelled once, in ``jfe_jax/workdir.py``.

``layout_literals`` scans the package's source (``ast``, every module but workdir.py) for
string constants that are a workdir file or folder name (docstrings aside). The generic word
``tokenizer`` (also a config field and an option) counts only where it is a path component:
an argument of ``os.path.join`` or an operand of ``/``. The Hugging Face directory layout,
which shares ``config.json`` with the workdir's, is exempt by name.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from jfe_jax import workdir as workdir_lib
from jfe_jax.models.sizes import get_size
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.config_base import base_config
from jfe_jax.train.metrics import MetricWriter
from jfe_jax.train.run_control import WorkdirLock
from jfe_jax.train.trainer import write_run_record
from jfe_jax.workdir import Workdir, is_workdir

ROOT = Path(__file__).resolve().parent.parent / "jfe_jax"
PATH_ONLY = {workdir_lib.TOKENIZER_DIR}  # names that are also plain words
# (file or folder, name): the Hugging Face directory layout, which is not the workdir's.
HF_LAYOUT = {
    ("models/config.py", "config.json"),
    ("models/hf_io.py", "config.json"),
    ("models/fingerprint.py", "config.json"),
    ("models/mire/", "config.json"),  # MIRe's model directory: HF sub-directories
    ("models/mire/", "tokenizer"),
}


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _path_components(tree: ast.Module) -> set[int]:
    """ids of the constants joined into a path: ``*.join(..., c)`` and ``a / c``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "join":
            found |= {id(a) for a in node.args}
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found |= {id(node.left), id(node.right)}
    return found


def layout_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each string constant in ``source`` that spells one of ``names``."""
    tree = ast.parse(source)
    skip, paths = _docstrings(tree), _path_components(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in skip:
            if node.value not in PATH_ONLY or id(node) in paths:
                hits.append((node.lineno, node.value))
    return sorted(hits)


def test_workdir_paths_are_the_documented_layout():
    w = Workdir("gs://bucket/run")
    assert w.checkpoints == "gs://bucket/run/checkpoints"
    assert w.step_dir(20) == "gs://bucket/run/checkpoints/20"
    assert w.fingerprint(20) == "gs://bucket/run/checkpoints/20/jfe_fingerprint.json"
    assert w.tokenizer == "gs://bucket/run/tokenizer"
    assert w.run_config == "gs://bucket/run/config.json"
    assert w.model_config == "gs://bucket/run/model_config.json"
    assert w.item_format == "gs://bucket/run/jfe_item_format.json"
    assert w.run_info == "gs://bucket/run/run_info.json"
    assert w.metrics == "gs://bucket/run/metrics.jsonl"
    assert w.tensorboard == "gs://bucket/run/tensorboard"
    assert w.train_summary == "gs://bucket/run/train_summary.json"
    assert w.lock == "gs://bucket/run/.jfe-train.lock"
    assert w.tfds == "gs://bucket/run/tfds"


def test_workdir_takes_path_likes_and_is_frozen(tmp_path):
    w = Workdir(tmp_path)
    assert w.path == str(tmp_path) and w == Workdir(str(tmp_path))
    with pytest.raises(AttributeError):
        w.path = "elsewhere"


def test_is_workdir_tells_a_workdir_from_an_hf_dir_an_empty_one_and_a_missing_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (hf / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert is_workdir(run) and is_workdir(str(run))
    assert not is_workdir(hf)
    assert not is_workdir(tmp_path / "empty")
    assert not is_workdir(tmp_path / "missing")


def test_the_trainer_writes_its_record_metrics_and_lock_where_workdir_says(tmp_path):
    config, model_config = base_config(), get_size("tiny")
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    write_run_record(str(tmp_path), config, model_config, mesh)
    w = Workdir(tmp_path)
    for path in (w.run_config, w.model_config, w.item_format, w.run_info):
        assert os.path.isfile(path), path
    assert json.loads(Path(w.model_config).read_text()) == model_config.to_hf_dict()
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"loss": 0.5})
    writer.close()
    assert Path(w.metrics).read_text().splitlines() == ['{"step": 1, "loss": 0.5}']
    assert os.path.isdir(w.tensorboard)
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.path == w.lock and os.path.isfile(w.lock)


def test_layout_literals_finds_names_and_tokenizer_only_in_a_path():
    source = (
        '"""Writes config.json."""\n'
        'A = "metrics.jsonl"\n'
        'b = options.get("tokenizer")\n'
        'c = os.path.join(root, "tokenizer")\n'
        'd = root / "checkpoints"\n'
    )
    names = set(workdir_lib.LAYOUT_NAMES)
    assert layout_literals(source, names) == [
        (2, "metrics.jsonl"),
        (4, "tokenizer"),
        (5, "checkpoints"),
    ]


def test_workdir_file_names_are_spelled_only_in_workdir_py():
    names = set(workdir_lib.LAYOUT_NAMES)
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "workdir.py":
            continue
        for line, name in layout_literals(path.read_text(encoding="utf-8"), names):
            if not any(rel.startswith(where) and name == n for where, n in HF_LAYOUT):
                found.append(f"jfe_jax/{rel}:{line}: {name!r}")
    assert not found, "use jfe_jax.workdir instead of spelling the layout:\n" + "\n".join(found)
