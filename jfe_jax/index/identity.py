"""What made an export or an index (model, item format, source), and whether two agree.

An export's identity is written into each of its shards (``identity.json``, renamed into place
with the shard) and into each host's metadata; ``jfe index build`` copies it into the index.
Cached shards are reused, and an index is searched, only under the same model fingerprint
(``Encoder.fingerprint``) and item format hash (``ItemEmbedder.item_format_hash``); shards also
need the same source and shard size. The model's path and step are kept for messages only: a
moved model is the same model, and another checkpoint of the same workdir is not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from jfe_jax.data.item_format import differences
from jfe_jax.models.fingerprint import is_current_form, short

MODEL_KEYS = ("model_fingerprint", "item_format_hash")  # what computed the embeddings
EXPORT_KEYS = (*MODEL_KEYS, "source", "shard_size")  # ... and of which items, how sharded
# The fields of `model_identity`, which exports, indexes and results.json record.
RECORD_KEYS = ("model", "checkpoint_step", "model_fingerprint", "item_format", "item_format_hash")


def model_identity(embedder: Any) -> dict[str, Any]:
    """The model and item format of an ``ItemEmbedder``, as exports and indexes record them."""
    encoder = embedder.encoder
    return {
        "model": encoder.source_dir,
        "checkpoint_step": encoder.step,
        "model_fingerprint": encoder.fingerprint,
        "item_format": embedder.item_format,
        "item_format_hash": embedder.item_format_hash,
    }


def describe_model(identity: Mapping[str, Any]) -> str:
    """``1a2b3c4d5e6f (step 300, /runs/a)``: short fingerprint, step and path, for users."""
    step = identity.get("checkpoint_step")
    where = [f"step {step}"] if step is not None else []
    where += [identity["model"]] if identity.get("model") else []
    fingerprint = short(identity.get("model_fingerprint"))
    return f"{fingerprint} ({', '.join(where)})" if where else fingerprint


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _describe_source(source: Any) -> str:
    if not isinstance(source, Mapping) or not source:
        return json.dumps(source)
    return ", ".join(
        f"{k}={short(v) if isinstance(v, str) and len(v) > 32 else v}"
        for k, v in sorted(source.items())
    )


def mismatch(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    keys: Sequence[str] = EXPORT_KEYS,
    *,
    this: str = "this is",
) -> str | None:
    """None when ``stored`` agrees with ``current`` on ``keys``; else what differs, worded to
    follow "export X was made " (e.g. "by model fingerprint 1a2b3c4d5e6f (step 300, /runs/a),
    this is 9f8e7d6c5b4a (step 600, /runs/a)"). A stored identity without a fingerprint
    (written by an older jfe-jax, or a partial write) never agrees."""
    if not stored or not stored.get("model_fingerprint"):
        return "without a model fingerprint (by an older jfe-jax, or the write was cut short)"
    if not is_current_form(stored["model_fingerprint"]) and is_current_form(
        current.get("model_fingerprint")
    ):
        return (
            f"by an older jfe-jax (model fingerprint {short(stored['model_fingerprint'])} hashed "
            "the weight files; fingerprints now hash the weights' values, so a workdir and its "
            "converted directory share one): it cannot be matched to a model, rebuild it"
        )
    found = []
    if "model_fingerprint" in keys and stored["model_fingerprint"] != current["model_fingerprint"]:
        found.append(
            f"by model fingerprint {describe_model(stored)}, {this} {describe_model(current)}"
        )
    if "item_format_hash" in keys and stored.get("item_format_hash") != current["item_format_hash"]:
        old, new = stored.get("item_format") or {}, current.get("item_format") or {}
        found.append(
            f"with item format {short(stored.get('item_format_hash'))}, {this} "
            f"{short(current['item_format_hash'])} (they differ in "
            f"{'; '.join(differences(old, new)) or '?'})"
        )
    if "source" in keys and _canonical(stored.get("source")) != _canonical(current["source"]):
        found.append(
            f"from {_describe_source(stored.get('source'))}, {this} "
            f"{_describe_source(current['source'])}"
        )
    if "shard_size" in keys and stored.get("shard_size") != current["shard_size"]:
        found.append(f"with shard size {stored.get('shard_size')}, {this} {current['shard_size']}")
    return "; and ".join(found) or None


def check_index_model(
    index_metadata: Mapping[str, Any], current: Mapping[str, Any], index_dir: str, *, this: str
) -> None:
    """Raises ValueError (one line, naming both models) unless an index's embeddings were made
    by ``current``'s model fingerprint and item format; ``this`` names the other side
    ("--model is", "the queries' export has")."""
    user = index_metadata.get("user", {})
    if not user.get("model_fingerprint"):
        raise ValueError(
            f"index {index_dir} has no model fingerprint (built by an older jfe-jax), so it "
            "cannot be matched to a model; rebuild it (jfe export the pool, then jfe index build)"
        )
    if not is_current_form(user["model_fingerprint"]) and is_current_form(
        current.get("model_fingerprint")
    ):
        raise ValueError(
            f"index {index_dir} was built by an older jfe-jax, whose model fingerprints hashed "
            "the weight files (they now hash the weights' values, shared by a workdir and its "
            "converted directory), so it cannot be matched to a model; rebuild it (jfe export "
            "the pool, then jfe index build)"
        )
    what = mismatch(user, current, MODEL_KEYS, this=this)
    if what:
        raise ValueError(
            f"index {index_dir} holds embeddings made {what}: was this index built by another "
            "model? Search it with the model that built it, or rebuild it with this one"
        )
