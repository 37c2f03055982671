"""Stage 1 (post-training adaptation) of the demo: tiny model, synthetic pairs, 2 CPU cores.

jfe train --config configs/stage1_demo.py --workdir /tmp/s1 --config.data.root=/tmp/bench
"""

from jfe_jax.train.config_base import base_config


def get_config():
    c = base_config()
    c.stage = "stage1"
    c.model.size = "tiny"
    c.data.kind = "pairs"
    c.data.global_batch_size = 32
    c.data.length_buckets = (64, 128)
    c.data.max_length = 128
    c.data.query_patch_budget = 64
    c.data.candidate_patch_budget = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.train.num_steps = 150
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 50
    c.lock()
    return c
