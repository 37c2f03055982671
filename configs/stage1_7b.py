"""Stage 1 at real scale: Qwen2-VL-7B from a Hugging Face directory, NLI triples + captions.

Recipe (REFERENCE.md, after E5-V / LamRA): LoRA rank 64 alpha 128, vision tower frozen,
temperature 0.05, global batch 576, lr 4e-5, one epoch (about 470 steps on 270k triples).

    jfe train --config configs/stage1_7b.py --workdir gs://BUCKET/jfe/stage1_7b \
        --config.model.init_from=/data/Qwen2-VL-7B-Instruct --config.data.root=/data/pairs
"""

from jfe_jax.train.config_base import base_config


def get_config():
    c = base_config()
    c.stage = "stage1"
    c.model.size = "7b"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots_no_batch"
    c.model.lora_rank = 64
    c.model.lora_alpha = 128.0
    c.data.kind = "pairs"
    c.data.global_batch_size = 576
    c.data.length_buckets = (128, 256, 512)
    c.data.max_length = 512
    c.data.query_patch_budget = 1024
    c.data.candidate_patch_budget = 1024
    c.data.image_max_pixels = 448 * 448
    c.data.worker_count = 8
    c.optimizer.learning_rate = 4e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.trainable = "lora"
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.train.num_steps = 470
    c.train.grad_cache_chunk = 64
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 100
    c.lock()
    return c
