"""Stage 1 (post-training adaptation) of the demo: tiny model, synthetic pairs, 2 CPU cores.

    jfe train --config configs/stage1_demo.py --workdir /tmp/s1 --config.data.root=/tmp/bench

The fields live in jfe_jax.train.config_base.demo_stage1_config, which `jfe demo` uses too.
"""

from jfe_jax.train.config_base import demo_stage1_config


def get_config():
    c = demo_stage1_config()
    c.lock()
    return c
