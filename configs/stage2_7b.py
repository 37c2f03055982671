"""Stage 2 at real scale: M-BEIR union training set with instructions, from a stage-1 workdir.

Recipe (after LamRA): global batch 960 (1024 here, a power of two for the mesh), lr 1e-4,
one epoch of the 1.1M-query union, LoRA rank 64, vision frozen, temperature 0.05.

    jfe train --config configs/stage2_7b.py --workdir gs://BUCKET/jfe/stage2_7b \
        --config.model.init_from=gs://BUCKET/jfe/stage1_7b --config.data.root=/data/M-BEIR
"""

from jfe_jax.train.config_base import base_config


def get_config():
    c = base_config()
    c.stage = "stage2"
    c.model.size = "7b"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots_no_batch"
    c.model.lora_rank = 64
    c.model.lora_alpha = 128.0
    c.data.kind = "mbeir"
    c.data.split = "union_train"
    c.data.global_batch_size = 1024
    c.data.num_hard_negatives = 0
    c.data.length_buckets = (128, 256, 512)
    c.data.max_length = 512
    c.data.query_patch_budget = 1024
    c.data.candidate_patch_budget = 1024
    c.data.image_max_pixels = 448 * 448
    c.data.worker_count = 8
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.trainable = "lora"
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.train.num_steps = 1100
    c.train.grad_cache_chunk = 64
    c.train.checkpoint_every_steps = 200
    c.lock()
    return c
