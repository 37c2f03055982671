"""Stage 1 (post-training adaptation) at real scale: Qwen2-VL-7B from a Hugging Face directory.

The recipe lives in jfe_jax.train.config_base.stage1_config (one place for both sizes).

    jfe train --config configs/stage1_7b.py --workdir gs://BUCKET/jfe/stage1_7b \
        --config.model.init_from=/models/Qwen2-VL-7B-Instruct --config.data.root=/data/pairs
"""

from jfe_jax.train.config_base import stage1_config


def get_config():
    c = stage1_config("7b")
    c.lock()
    return c
