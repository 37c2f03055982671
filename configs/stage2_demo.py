"""Stage 2 (instruction tuning) of the demo on the synthetic M-BEIR tasks, from stage 1.

    jfe train --config configs/stage2_demo.py --workdir /tmp/s2 \
        --config.data.root=/tmp/bench --config.model.init_from=/tmp/s1

The fields live in jfe_jax.train.config_base.demo_stage2_config, which `jfe demo` uses too.
"""

from jfe_jax.train.config_base import demo_stage2_config


def get_config():
    c = demo_stage2_config()
    c.lock()
    return c
