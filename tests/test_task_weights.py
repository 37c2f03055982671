"""data.task_weights: the share of one-task batches (data.task_batches) each task gets."""

from __future__ import annotations

import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic

from jfe_jax.models.sizes import get_size
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.config_base import demo_stage2_config
from jfe_jax.train.config_checks import check_config
from jfe_jax.train.data import make_train_data, task_weights

TASKS = ("webqa_task1", "mscoco_task0", "infoseek_task6")


def test_named_tasks_get_their_weight_and_the_others_one():
    sizes = {"a": 300, "b": 600, "c": 9600}
    assert task_weights((), sizes) == {"a": 300.0, "b": 600.0, "c": 9600.0}
    assert task_weights((("c", 4), ("a", 0.5)), sizes) == {"a": 0.5, "b": 1.0, "c": 4.0}
    # Lists (a config read back from JSON) are pairs too.
    assert task_weights([["b", 2.0]], sizes) == {"a": 1.0, "b": 2.0, "c": 1.0}


@pytest.mark.parametrize(
    "named, match",
    [
        ((("d", 1.0),), r"names \['d'\], which have no training queries here"),
        ((("a", 0.0),), "a has weight 0.0; expected > 0"),
        ((("a", -1.0),), "expected > 0"),
        ((("a", 1.0), ("a", 2.0)), "names a task twice"),
        ((("a", 1.0, 2.0),), r"expected \(\(task, weight\), ...\) pairs"),
    ],
)
def test_bad_task_weights_name_what_is_wrong(named, match):
    with pytest.raises(ValueError, match=match):
        task_weights(named, {"a": 3, "b": 4})


def test_task_weights_need_one_task_batches():
    config = demo_stage2_config()
    config.data.task_weights = (("infoseek_task6", 4.0),)
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    with pytest.raises(ValueError, match="needs data.kind='mbeir' and data.task_batches=True"):
        check_config(config, mesh)
    config.data.task_batches = True
    check_config(config, mesh)


def test_train_data_draws_each_task_by_its_weight(tmp_path):
    bench = make_bench(tmp_path / "bench", small_synthetic(TASKS, train_queries_per_task=8))
    config = demo_stage2_config()
    config.data.root = bench
    config.data.global_batch_size = 8
    config.data.task_batches = True
    config.data.task_weights = (("infoseek_task6", 6.0), ("webqa_task1", 0.5))
    model_config = get_size("tiny")
    stream = make_train_data(config, str(tmp_path / "work"), model_config)
    assert stream.names == sorted(TASKS)
    # sorted: infoseek_task6, mscoco_task0, webqa_task1
    np.testing.assert_allclose(stream.probabilities, np.array([6.0, 1.0, 0.5]) / 7.5)
    batch = next(stream)  # a whole batch of one task comes out
    assert batch.query.input_ids.shape[0] == 8

    # Without weights the tasks are drawn in proportion to their training pairs.
    config.data.task_weights = ()
    stream = make_train_data(config, str(tmp_path / "work"), model_config)
    counts = np.array([8.0, 8.0, 8.0])
    np.testing.assert_allclose(stream.probabilities, counts / counts.sum())
