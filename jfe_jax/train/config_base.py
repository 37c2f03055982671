"""The one place every training field is declared, with its comment.

Experiment files (``configs/stage1_*.py``, ``configs/stage2_*.py``) start from
``base_config()`` and override values; the config is then locked, so a misspelt override on
the command line (``--config.optimizer.lerning_rate=...``) fails before anything is built.

Code below the trainer reads its defaults from ``DEFAULTS`` (``EncoderOptions``' fields, the
optimizer's keyword defaults, the item format's) instead of repeating them; the settings of a
Qwen2-VL checkpoint that was not trained here are ``QWEN2_VL_DEFAULTS``. This module imports
nothing from the package, so every layer may import it (tests/test_import_graph.py,
tests/test_declared_once.py).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "stage1"  # stage1: post-training adaptation on pairs; stage2: M-BEIR instructions
    c.seed = 0  # data order, seeded instructions, random init when init_from is empty

    c.model = ml_collections.ConfigDict()
    c.model.size = "tiny"  # a named size (tiny, small, 2b, 7b) used when init_from is empty
    # Initial weights: a Hugging Face Qwen2-VL directory, or a stage-1 workdir (stage 2).
    # Empty: random init of `size` (tests, demo from scratch).
    c.model.init_from = ""
    c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU)
    c.model.param_dtype = "float32"  # storage dtype of params and optimizer state
    c.model.scan_layers = False  # scan over layers: one compiled layer, faster compiles
    c.model.remat = "none"  # none | full | dots | dots_no_batch
    c.model.lora_rank = 0  # LoRA rank on the decoder projections; 0 = no adapters
    c.model.lora_alpha = 0.0  # LoRA scale numerator (update scaled by alpha / rank)
    # The decoder projections that get adapters (some of language.LORA_TARGETS_ALL).
    c.model.lora_targets = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    c.model.projection_dim = 0  # linear head after pooling; 0 keeps the LLM width
    c.model.temperature = 0.05  # initial InfoNCE temperature
    # einsum | dot_product_attention (models/layers.py): the same outputs, another lowering.
    # einsum: no slower on CPU (benchmarks/README.md), and dot_product_attention's
    # implementation=None brings no fused kernel on TPU or GPU.
    c.model.attention_impl = "einsum"
    c.model.learn_temperature = False  # train logit_scale = log(1/temperature)
    # early: JFE, image and text in one sequence; late: the baseline that embeds them apart
    # with the same tower and adds the embeddings (UniIR's score fusion)
    c.model.fusion = "early"

    c.data = ml_collections.ConfigDict()
    c.data.kind = "pairs"  # pairs (stage 1: text triples + image captions) | mbeir (stage 2)
    c.data.root = ""  # M-BEIR-layout directory (real, or written by `jfe demo`)
    c.data.split = "train"  # query split for mbeir: train | union_train
    c.data.tokenizer = ""  # tokenizer directory; empty: the init_from directory's tokenizer
    c.data.tfds_dir = ""  # where the prepared datasets are written; empty: <workdir>/tfds
    # The content-addressed image store shared by every workdir on this data root (records
    # hold references into it; jfe_jax.data.image_store); empty: <data.root>/.jfe_image_store
    # when the root is writable, else a per-user cache folder. On several hosts: a folder
    # every host sees, like tfds_dir.
    c.data.image_store = ""
    c.data.prepare_workers = -1  # processes that read images into the store; -1: every core
    # Hosts other than 0 wait this long (on the filesystem) for host 0 to prepare the data.
    c.data.prepare_wait_s = 6 * 3600.0
    c.data.global_batch_size = 32  # queries per step over all hosts (each has one positive)
    c.data.num_hard_negatives = 0  # extra negatives per query taken from the data
    # Stage 2: every batch from one task (in-batch negatives of the task's own kind, like its
    # evaluation pool), tasks drawn in proportion to their pairs; needs one query file per
    # task in the split (query/train/). False: batches mix tasks, as UniIR trains.
    c.data.task_batches = False
    # With task_batches: ((task, weight), ...) draws each batch's task with probability
    # weight / total (tasks not named weigh 1.0); empty: in proportion to the tasks' pairs.
    c.data.task_weights = ()
    c.data.length_buckets = (64, 128, 256)  # padded sequence lengths (one program each)
    c.data.max_length = 256  # longer items raise, unless truncate_text
    c.data.truncate_text = False  # shorten only the text part of over-long items
    c.data.query_patch_budget = 64  # image patches per query row (0: text-only queries)
    c.data.candidate_patch_budget = 64  # image patches per candidate row
    c.data.image_max_pixels = 112 * 112  # Qwen2-VL max_pixels: bounds patches per image
    c.data.image_min_pixels = 56 * 56  # Qwen2-VL min_pixels
    c.data.instruction_mode = "fixed"  # fixed (first prompt) | seeded (hash of seed, qid)
    c.data.prompt = "Summarize above image and sentence in one word:"  # embedding prompt
    c.data.worker_count = 0  # grain worker processes (0: in the main process)
    # Threads reading records ahead of the transform in each process, and how many records
    # they keep ready (grain's defaults, for remote storage). Local files on a few cores read
    # faster with 0 threads: the demo spends 45 ms less per batch of 32 on 2 cores.
    c.data.read_threads = 16
    c.data.read_buffer_size = 500
    c.data.skip_bad_records = False  # count and log bad records instead of raising
    # Keep encoded examples (decoded, resized images; token ids) in memory across epochs, up
    # to this many MiB per encoding process (jfe_jax.data.example_cache); 0: encode every
    # record on every pass. Pays off when a run makes many passes over a small dataset.
    c.data.cache_examples_mb = 0
    # How the dataset build checks each image before training reads it: header (open it and
    # check its size against the decompression-bomb cap; no pixel decoded), full (also decode
    # it: catches truncated files, costs one decode per image), none.
    c.data.verify_images = "header"
    # Pack several items of a side end to end in each row (segment-masked attention, one
    # static shape per side). Early fusion only. With train.grad_cache_chunk (a multiple of
    # the data-parallel size) each side is packed in the cache's chunks, every chunk's items
    # in rows of their own (packing.pack_items(chunks=)).
    c.data.pack = False
    c.data.pack_items_per_row = 4  # rows per side = ceil(items / this), rounded to the shards
    c.data.pack_length = 0  # tokens per packed row; 0: the largest of length_buckets
    # Run each side's images through the vision tower in vision rows of their own, filled
    # densely (first-fit), instead of in every text row's patch budget: the same loss and
    # gradients, no vision work on text-only rows' budgets or images' slack; image tokens are
    # gathered back into their rows. Works with pack and with train.grad_cache_chunk (the
    # tower runs once over the vision rows, outside the text chunks). Off by default: the
    # vision row count follows each batch's images (a few more compiled shapes, as the length
    # buckets) unless pack_vision_row_fraction fixes it.
    c.data.pack_vision = False
    # With pack_vision: > 0 fixes each side's vision rows per host at this fraction of the
    # side's items (e.g. 0.5 when at most half of a side's items carry an image that fills a
    # row): one compiled shape, and the same count on every host, which several hosts need
    # (0, rows as each batch needs, is single-host). A batch needing more rows raises.
    c.data.pack_vision_row_fraction = 0.0
    # With pack_vision: image patch counts (multiples of 4) whose images get per-image blocks,
    # rows of exactly their size, so attention computes no cross-image scores; the others
    # share masked rows. One more compiled shape per size: list recurring sizes only.
    c.data.pack_vision_blocks = ()

    c.loss = ml_collections.ConfigDict()
    c.loss.symmetric = False  # also the candidate -> query direction
    c.loss.mask_false_negatives = True  # mask duplicates of the positive among negatives

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4  # peak, after warmup
    c.optimizer.end_learning_rate = 0.0  # cosine end value
    # The cosine's share of the steps after warmup, the last ones; the peak holds before it
    # (warmup-stable-decay). 1.0: cosine from the end of warmup.
    c.optimizer.decay_fraction = 1.0
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.01  # never on norms, biases and scalars
    c.optimizer.max_grad_norm = 1.0  # global-norm clipping; 0 disables
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.trainable = "full"  # full | freeze_vision | lora
    # {path regex: lr multiplier}, first match wins, e.g. {"vision": 0.1}
    c.optimizer.lr_multipliers = ml_collections.ConfigDict()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: whatever the device count leaves
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100
    c.train.grad_cache_chunk = 0  # rows embedded at once with gradient caching; 0: off
    c.train.log_every = 10  # steps between metric writes
    c.train.checkpoint_every_steps = 50
    c.train.checkpoint_every_seconds = 1800.0  # also save on this timer
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.distributed = False  # call jax.distributed.initialize() first (multi-host)
    return c


# The base config, frozen: the defaults that EncoderOptions, the optimizer's keywords and the
# data side (ItemFormat's prompt, truncate_text, pack and fusion; encode_item) read.
DEFAULTS = ml_collections.FrozenConfigDict(base_config())

# Qwen2-VL's own inference settings: the item format (ItemFormat's defaults) of a model
# directory that carries none (no jfe_item_format.json, no training config, no
# preprocessor_config.json), and the image processor's defaults (those of transformers'
# Qwen2VLImageProcessor). They differ from data's on purpose: a checkpoint trained elsewhere
# saw images resized within the processor's pixel limits, so it is fed at those limits with
# patch budgets that hold any such image, and items up to 2048 tokens; training's smaller
# values bound a step's memory. Every other item-format option (prompt, truncate_text, pack,
# model.fusion) is DEFAULTS'.
QWEN2_VL_DEFAULTS = ml_collections.FrozenConfigDict(
    {
        "length_buckets": (64, 128, 256, 512, 1024, 2048),  # padded sequence lengths
        "max_length": 0,  # 0: the largest length bucket
        # None: derived from image_max_pixels (item_format.derived_patch_budget)
        "query_patch_budget": None,
        "candidate_patch_budget": None,
        "image_min_pixels": 56 * 56,  # smart-resize bounds on the resized image area
        "image_max_pixels": 28 * 28 * 1280,
    }
)


def demo_stage1_config() -> ml_collections.ConfigDict:
    """Stage 1 of the demo: tiny model, synthetic pairs, minutes on 2 CPU cores. The tiny
    model starts from random weights, so its vision tower learns here (every weight trains)
    and is frozen in stage 2."""
    c = base_config()
    c.stage = "stage1"
    c.model.size = "tiny"
    c.data.kind = "pairs"
    c.data.global_batch_size = 32
    # The synthetic items are 30-90 tokens: rows padded to 80 or 96 instead of 128 where they
    # fit (stage 1: 7.9 steps/s against 5.8 with (64, 128); benchmarks/README.md).
    c.data.length_buckets = (64, 80, 96, 128)
    c.data.max_length = 128
    c.data.read_threads = 0  # local files, 2 cores: reading in the main thread is fastest
    c.data.cache_examples_mb = 2048  # many epochs of a small dataset: encode each record once
    c.data.query_patch_budget = 64
    c.data.candidate_patch_budget = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    # 900 steps: stage 2 keeps the vision tower this stage trains (demo_stage2_config). With
    # 300 and a frozen tower the cross-modal tasks lost 20-40 points (average 56 against 76),
    # with 600 oven_task8 fell under 5x chance (benchmarks/README.md, "Main job").
    c.train.num_steps = 900
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 300
    return c


def demo_stage2_config() -> ml_collections.ConfigDict:
    """Stage 2 of the demo: instruction tuning on the synthetic M-BEIR tasks, from stage 1."""
    c = demo_stage1_config()
    c.stage = "stage2"
    c.data.kind = "mbeir"
    c.data.split = "train"
    # Stage 1's length buckets: the queries are 60-90 tokens and the candidates 30-70, rows
    # padded to 96 and 80 instead of 128 each, 22% more examples per second on 2 cores.
    c.optimizer.learning_rate = 1e-3
    # The vision tower stays as stage 1 left it (the real recipes never train it: LoRA on the
    # decoder only, stage2_config): no backward pass through it, 1.3-1.5x the steps per
    # second on 2 CPU cores (benchmarks/README.md, "Main job").
    c.optimizer.trainable = "freeze_vision"
    c.train.num_steps = 2400
    c.train.checkpoint_every_steps = 600
    return c


# FSDP degree per size for the real-scale recipes (7B needs more sharding of its weights).
_FSDP = {"2b": 4, "7b": 8}
# Stage-2 gradient-cache chunk per size: a multiple of the data-parallel size of v5p-64 (32),
# v5p-128 (64) and v5e-256 (256) keeps every chip busy on every chunk, and fewer chunks
# gather the FSDP-sharded weights fewer times. 2b at 256 on v5p-64: 15.5 GiB per chip, ICI
# traffic a quarter of chunk 64's (`jfe aot`). 7b at 256: 12.7 of 16 GiB on v5e-256, where
# chunk 64 repeated every chunk's work on 4x the chips (MFU 13.9% -> 59.3% at the cost
# model), and 32.1 of 95 GiB on v5p-64 (69.2% against chunk 64's 74.0%; per-op cycles 2%
# faster) (benchmarks/README.md).
_STAGE2_GRAD_CACHE_CHUNK = {"2b": 256, "7b": 256}


def stage1_config(size: str) -> ml_collections.ConfigDict:
    """Stage 1 at real scale (after E5-V / LamRA): Qwen2-VL from a Hugging Face directory, NLI
    triples + image captions, LoRA rank 64 alpha 128, vision frozen, temperature 0.05, global
    batch 576, lr 4e-5, one epoch (about 470 steps on 270k triples)."""
    c = base_config()
    c.stage = "stage1"
    c.model.size = size
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
    c.mesh.fsdp = _FSDP[size]
    c.train.num_steps = 470
    c.train.grad_cache_chunk = 64
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 100
    return c


def stage2_config(size: str) -> ml_collections.ConfigDict:
    """Stage 2 at real scale (after LamRA): the M-BEIR union training set with instructions,
    from a stage-1 workdir; global batch 1024 (LamRA: 960), lr 1e-4, one epoch of the 1.1M
    union queries."""
    c = stage1_config(size)
    c.stage = "stage2"
    c.data.kind = "mbeir"
    c.data.split = "union_train"
    c.data.global_batch_size = 1024
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 100
    c.train.num_steps = 1100
    c.train.grad_cache_chunk = _STAGE2_GRAD_CACHE_CHUNK[size]
    c.train.checkpoint_every_steps = 200
    return c
