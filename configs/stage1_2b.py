"""Stage 1 (post-training adaptation) at real scale: Qwen2-VL-2B from a Hugging Face directory.

The recipe lives in jfe_jax.train.config_base.stage1_config (one place for both sizes).

    jfe train --config configs/stage1_2b.py --workdir gs://BUCKET/jfe/stage1_2b \
        --config.model.init_from=/models/Qwen2-VL-2B-Instruct --config.data.root=/data/pairs
"""

from jfe_jax.train.config_base import stage1_config


def get_config():
    c = stage1_config("2b")
    c.lock()
    return c
