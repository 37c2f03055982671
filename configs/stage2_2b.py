"""Stage 2 (instruction tuning on the M-BEIR union training set) at real scale.

The recipe lives in jfe_jax.train.config_base.stage2_config (one place for both sizes).

    jfe train --config configs/stage2_2b.py --workdir gs://BUCKET/jfe/stage2_2b \
        --config.model.init_from=gs://BUCKET/jfe/stage1_2b --config.data.root=/data/M-BEIR
"""

from jfe_jax.train.config_base import stage2_config


def get_config():
    c = stage2_config("2b")
    c.lock()
    return c
