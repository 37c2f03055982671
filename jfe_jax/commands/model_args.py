"""The arguments the model-loading commands share (``jfe export``, ``jfe search``, ``jfe
eval``): the model and how it is placed (``--mesh``), the item format (``--truncate-text``),
the queries' instructions, and the embedder they make."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from jfe_jax.errors import positive_int
from jfe_jax.models.axes import MESH_AXES


def model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--batch-size``, ``--mesh`` and ``--truncate-text``."""
    parser.add_argument("--model", required=True, help="jfe train workdir or HF Qwen2-VL dir")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="rows per device step")
    mesh_arg(parser)
    truncate_text_arg(parser)


def truncate_text_arg(parser: argparse.ArgumentParser) -> None:
    """``--truncate-text``: shorten an over-long item's text instead of failing on it."""
    parser.add_argument(
        "--truncate-text",
        action="store_true",
        help="shorten the text of an item longer than the model's max_length (never its "
        "instruction or image) instead of failing; it changes the item format, so an index is "
        "searched with the setting it was exported with. Off: as the model's item format says",
    )


def format_overrides(args: argparse.Namespace) -> dict:
    """The ``ItemFormat`` fields the command line sets (``embedder_for`` overrides)."""
    return {"truncate_text": True} if args.truncate_text else {}


@contextlib.contextmanager
def cli_remedies() -> Iterator[None]:
    """Errors whose remedy names a Python argument, reworded for the command line."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if "pass truncate_text=True" not in message:
            raise
        raise ValueError(message.replace("pass truncate_text=True", "pass --truncate-text")) from (
            error
        )


def mesh_spec(text: str) -> dict[str, int]:
    """argparse type of ``--mesh``: "data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1}.

    Axes not named are 1; one axis may be -1 (the devices left over). The device count is
    checked when the mesh is built (``jfe_jax.train.mesh.make_mesh``)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected comma-separated axis=size with axes {', '.join(MESH_AXES)}"
                f" (e.g. data=2,fsdp=4), got {part!r}"
            )
        if name in seen:
            raise argparse.ArgumentTypeError(f"{text!r} names axis {name!r} twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {name}={value!r} is not an integer"
            ) from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise argparse.ArgumentTypeError(f"{text!r}: {name} must be >= 1 or -1")
    return sizes


def mesh_arg(parser: argparse.ArgumentParser) -> None:
    """``--mesh``: load the model's params into their shards over this host's devices."""
    parser.add_argument(
        "--mesh",
        type=mesh_spec,
        default=None,
        metavar="AXIS=N,...",
        help="shard the model's params over this host's devices, e.g. fsdp=8 or "
        "data=2,fsdp=4 (axes data, fsdp, tensor; unnamed ones 1, one may be -1), for a model "
        "too large to copy onto every device; rows split over data x fsdp. Default: every "
        "device holds a replicated copy",
    )


def model_mesh(args: argparse.Namespace):
    """The mesh ``--mesh`` asks for, or None."""
    if args.mesh is None:
        return None
    import jax

    from jfe_jax.train.mesh import make_mesh

    return make_mesh(args.mesh, devices=jax.local_devices())


def instruction_args(parser: argparse.ArgumentParser) -> None:
    """``--instruction-mode`` and ``--seed``: the instruction prefixed to each M-BEIR query."""
    parser.add_argument(
        "--instruction-mode",
        default="fixed",
        choices=["fixed", "seeded"],
        help="each query's instruction: the task's first (fixed) or one drawn per query (seeded)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of seeded instructions")


def load_embedder(args: argparse.Namespace, **kwargs):
    """The ``ItemEmbedder`` of ``--model`` at ``--batch-size``, placed as ``--mesh`` says, with
    the command line's item format; ``kwargs`` go to ``embedder_for`` (``image_root``)."""
    from jfe_jax.encoder import embedder_for

    return embedder_for(
        args.model,
        batch_size=args.batch_size,
        **kwargs,
        mesh=model_mesh(args),
        **format_overrides(args),
    )
