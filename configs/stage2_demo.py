"""Stage 2 (instruction tuning) of the demo on the synthetic M-BEIR tasks, from stage 1.

    jfe train --config configs/stage2_demo.py --workdir /tmp/s2 \
        --config.data.root=/tmp/bench --config.model.init_from=/tmp/s1
"""

from jfe_jax.train.config_base import base_config


def get_config():
    c = base_config()
    c.stage = "stage2"
    c.model.size = "tiny"
    c.data.kind = "mbeir"
    c.data.split = "train"
    c.data.global_batch_size = 32
    c.data.num_hard_negatives = 0
    c.data.length_buckets = (64, 128)
    c.data.max_length = 128
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.train.num_steps = 150
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 50
    c.lock()
    return c
