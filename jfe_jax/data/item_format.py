"""The item format: everything besides the weights that decides what the encoder is fed.

An ``ItemFormat`` (prompt, length buckets, max length, truncation, patch budgets, image
preprocessing, fusion, packing) is declared once per model and travels with it:

- ``jfe train`` writes it into the workdir (``jfe_item_format.json``) from its ``data`` config;
- ``Encoder.save_pretrained`` / ``jfe convert`` write it beside ``config.json`` (transformers
  ignores the file), with a ``preprocessor_config.json`` that carries the same pixel limits;
- ``embedder_for`` (``jfe eval``, ``jfe export``, ``jfe search``, the demo, the notebook)
  reads it back with ``ItemFormat.of_model``.

A directory without the file gets, in this order: a training workdir's ``config.json``
(workdirs from before the file existed), the image settings of its own
``preprocessor_config.json`` (or ``processor_config.json``) with patch budgets derived from
``max_pixels``, else the defaults of Qwen2-VL's processor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from jfe_jax.data.image_processor import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_CONFIG,
    PROCESSOR_CONFIG,
    ImageProcessor,
)
from jfe_jax.data.late_fusion import FUSIONS
from jfe_jax.train import config_base
from jfe_jax.workdir import ITEM_FORMAT_FILE, Workdir, is_workdir

# The training options' defaults, and Qwen2-VL's inference ones where a model directory
# without a format gets other values (config_base.QWEN2_VL_DEFAULTS says why).
_DATA = config_base.DEFAULTS.data
_QWEN2_VL = config_base.QWEN2_VL_DEFAULTS

VERSION = 1  # of the file layout; a file of a later version is refused
# Fields that do not change any embedding that both settings produce: out of the identity.
# pack changes only how items are batched; truncate_text only shortens items that would
# otherwise be refused, so a search may truncate its query against an index exported without.
_EMBEDDING_NEUTRAL = ("pack", "truncate_text")


def derived_patch_budget(max_pixels: int, patch_size: int, merge_size: int, max_length: int) -> int:
    """Patches per row that hold any one image the processor can produce: ``max_pixels`` over
    a patch's area, but never more than ``max_length`` tokens of image (a larger image could
    not fit in an item anyway), rounded up to a multiple of 16 (at least 16)."""
    patches = min(max_pixels // patch_size**2, max_length * merge_size**2)
    return max(16, -(-patches // 16) * 16)


@dataclasses.dataclass(frozen=True)
class ItemFormat:
    """What the encoder is fed for an item, besides the item. Budgets of None and a max_length
    of 0 are resolved when the object is made (see ``__post_init__``), so a saved format is
    always concrete. A budget of 0 means text-only rows, as in the training config.

    The defaults are a Qwen2-VL checkpoint's that carries no format: the training config's
    (``config_base.DEFAULTS``) but for the length buckets, budgets and pixel limits, which are
    Qwen2-VL's inference settings (``config_base.QWEN2_VL_DEFAULTS``)."""

    prompt: str = _DATA.prompt  # embedding prompt after each item
    length_buckets: tuple[int, ...] = _QWEN2_VL.length_buckets  # padded sequence lengths
    max_length: int = _QWEN2_VL.max_length  # longest item in tokens; 0: the largest bucket
    truncate_text: bool = _DATA.truncate_text  # shorten an over-long item's text (else raise)
    # Image patches per query / candidate row; None: derived from max_pixels; 0: text only.
    query_patch_budget: int | None = _QWEN2_VL.query_patch_budget
    candidate_patch_budget: int | None = _QWEN2_VL.candidate_patch_budget
    min_pixels: int = _QWEN2_VL.image_min_pixels  # smart-resize bounds on the resized area
    max_pixels: int = _QWEN2_VL.image_max_pixels
    patch_size: int = 14  # ViT patch side, in pixels (the model's vision config)
    temporal_patch_size: int = 2  # frames per patch (a still image is repeated)
    merge_size: int = 2  # patches merged per side into one LLM token
    image_mean: tuple[float, ...] = CLIP_MEAN  # per RGB channel, after x / 255
    image_std: tuple[float, ...] = CLIP_STD
    # early: image and text in one sequence; late: embedded apart
    fusion: str = config_base.DEFAULTS.model.fusion
    pack: bool = _DATA.pack  # several items per row (same embeddings, less padding); early only

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        buckets = tuple(sorted(int(b) for b in self.length_buckets))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"length_buckets {self.length_buckets} must be positive lengths")
        set_("length_buckets", buckets)
        set_("max_length", int(self.max_length) or buckets[-1])
        if self.max_length < 1:
            raise ValueError(f"max_length is {self.max_length}; expected >= 1 (0: largest bucket)")
        set_("image_mean", tuple(float(m) for m in self.image_mean))
        set_("image_std", tuple(float(s) for s in self.image_std))
        self.image_processor()  # checks the pixel limits, sizes, mean and std
        for name in ("query_patch_budget", "candidate_patch_budget"):
            value = getattr(self, name)
            value = self.derived_patch_budget if value is None else int(value)
            if value < 0:
                raise ValueError(
                    f"{name} is {value}; expected >= 0 (0: text-only rows; None: derived from "
                    "max_pixels)"
                )
            set_(name, value)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion {self.fusion!r} is unknown, expected one of {FUSIONS}")
        if self.pack and self.fusion != "early":
            raise ValueError(f"pack=True packs early-fusion items only; fusion is {self.fusion!r}")

    # ------------------------------------------------------------------ derived settings

    @property
    def derived_patch_budget(self) -> int:
        return derived_patch_budget(
            self.max_pixels, self.patch_size, self.merge_size, self.max_length
        )

    @property
    def patch_budget(self) -> int:
        """The one budget an ``ItemEmbedder`` pads every row to: the larger of the two."""
        return max(self.query_patch_budget, self.candidate_patch_budget)

    def image_processor(self, **overrides: Any) -> ImageProcessor:
        """The Qwen2-VL image processor of this format (``overrides``: e.g. max_image_pixels)."""
        return ImageProcessor(
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            image_mean=self.image_mean,
            image_std=self.image_std,
            **overrides,
        )

    def check_vision(self, vision: Any, model: str = "the model") -> None:
        """ValueError unless the patch sizes agree with a model's ``VisionConfig``."""
        for ours, theirs in (
            ("patch_size", "patch_size"),
            ("temporal_patch_size", "temporal_patch_size"),
            ("merge_size", "spatial_merge_size"),
        ):
            if getattr(self, ours) != getattr(vision, theirs):
                raise ValueError(
                    f"item format has {ours}={getattr(self, ours)} but {model}'s vision config "
                    f"has {theirs}={getattr(vision, theirs)}"
                )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def for_vision(cls, vision: Any, **fields: Any) -> ItemFormat:
        """A format with a model's patch sizes (``VisionConfig``) and ``fields``."""
        return cls(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            **fields,
        )

    @classmethod
    def for_processor(cls, processor: ImageProcessor, **fields: Any) -> ItemFormat:
        """A format with an image processor's settings, budgets derived from its max_pixels."""
        return cls(
            min_pixels=processor.min_pixels,
            max_pixels=processor.max_pixels,
            patch_size=processor.patch_size,
            temporal_patch_size=processor.temporal_patch_size,
            merge_size=processor.merge_size,
            image_mean=processor.image_mean,
            image_std=processor.image_std,
            **fields,
        )

    @classmethod
    def from_train_config(cls, config: Mapping[str, Any], vision: Any) -> ItemFormat:
        """The format a training run feeds: its ``data`` and ``model.fusion`` settings (a
        ConfigDict or the dict of a workdir's config.json) and the model's patch sizes."""
        d, model = config["data"], config["model"]
        return cls.for_vision(
            vision,
            prompt=d["prompt"],
            length_buckets=tuple(d["length_buckets"]),
            max_length=d["max_length"],
            truncate_text=d["truncate_text"],
            query_patch_budget=d["query_patch_budget"],
            candidate_patch_budget=d["candidate_patch_budget"],
            min_pixels=d["image_min_pixels"],
            max_pixels=d["image_max_pixels"],
            fusion=model["fusion"],
            pack=d["pack"],
        )

    @classmethod
    def of_model(cls, directory: str, vision: Any) -> tuple[ItemFormat, str]:
        """(format, where it came from) of a training workdir or a Hugging Face directory: its
        ``jfe_item_format.json``, else a workdir's config.json, else its image processor
        config with derived budgets, else Qwen2-VL's processor defaults."""
        root = epath.Path(directory)
        saved = cls.load(directory)
        if saved is not None:
            saved.check_vision(vision, directory)
            return saved, os.fspath(root / ITEM_FORMAT_FILE)
        run_config = epath.Path(Workdir(directory).run_config)
        if is_workdir(directory) and run_config.is_file():
            config = json.loads(run_config.read_text())
            return cls.from_train_config(config, vision), f"{run_config} (training config)"
        for name in (PREPROCESSOR_CONFIG, PROCESSOR_CONFIG):
            if (root / name).is_file():
                found = cls.for_processor(ImageProcessor.from_pretrained(directory))
                found.check_vision(vision, directory)
                return found, f"{root / name} (patch budgets derived from max_pixels)"
        return (
            cls.for_vision(vision),
            f"Qwen2-VL processor defaults (no {ITEM_FORMAT_FILE} or {PREPROCESSOR_CONFIG} "
            f"in {directory})",
        )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``version``."""
        fields = dataclasses.asdict(self)
        for name in ("length_buckets", "image_mean", "image_std"):
            fields[name] = list(fields[name])
        return {"version": VERSION, **fields}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], source: str = "item format") -> ItemFormat:
        fields = dict(value)
        version = fields.pop("version", None)
        if version != VERSION:
            raise ValueError(f"{source} has version {version!r}; this jfe-jax reads {VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{source} has unknown fields {unknown}; expected {sorted(known)}")
        return cls(**fields)

    def identity(self) -> dict[str, Any]:
        """The fields that change embeddings (hashed into export and index identities)."""
        fields = self.to_dict()
        for name in ("version", *_EMBEDDING_NEUTRAL):
            fields.pop(name)
        return fields

    def save(self, directory: str) -> str:
        """Writes ``jfe_item_format.json`` into ``directory``; returns its path."""
        path = epath.Path(directory) / ITEM_FORMAT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return os.fspath(path)

    @classmethod
    def load(cls, directory: str) -> ItemFormat | None:
        """The format saved in ``directory``, or None when it has no ``jfe_item_format.json``."""
        path = epath.Path(directory) / ITEM_FORMAT_FILE
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(value, dict):
            raise ValueError(f"{path} holds a {type(value).__name__}; expected a JSON object")
        return cls.from_dict(value, source=os.fspath(path))

    def describe(self) -> str:
        """The settings in one line, for logs."""
        budgets = (
            f"patches {self.query_patch_budget} per query row, "
            f"{self.candidate_patch_budget} per candidate row"
        )
        return (
            f"prompt {self.prompt!r}, length buckets {list(self.length_buckets)} "
            f"(max {self.max_length}{', text truncated' if self.truncate_text else ''}), "
            f"{budgets}, pixels {self.min_pixels}..{self.max_pixels} "
            f"(patch {self.patch_size}, merge {self.merge_size}), {self.fusion} fusion"
            f"{', packed' if self.pack else ''}"
        )


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``name: old vs new`` for each field where two format dicts differ (long values cut)."""

    def show(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:28] + "..." + text[-28:]

    return [
        f"{name}: {show(old.get(name))} vs {show(new.get(name))}"
        for name in sorted({*old, *new})
        if json.dumps(old.get(name), sort_keys=True) != json.dumps(new.get(name), sort_keys=True)
    ]
