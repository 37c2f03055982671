"""Every option is declared once, with its comment, in ``jfe_jax/train/config_base.py``.

``defaults_outside_config_base`` scans the package's source (``ast``, every module but
config_base) for the places that declare or default an option by name:

- ``field``: a class-body annotated field with a value (``lora_rank: int = 0``);
- ``parameter``: a function parameter with a default other than None;
- ``get``: a ``.get("<name>", <default>)`` call;
- ``config``: an assignment to ``<x>.<section>.<name>`` or ``<x>.<section>["<name>"]``.

A value that reads config_base (an expression naming the module, a name imported from it, or a
module-level name assigned from one of those, such as ``_DEFAULTS = config_base.DEFAULTS``) is
the one declaration read, not a second one, and is not reported.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "jfe_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
CONFIG_BASE = ROOT / "train" / "config_base.py"
CONFIG_BASE_MODULE = "jfe_jax.train.config_base"


@dataclasses.dataclass(frozen=True)
class Default:
    """One place that declares or defaults an option outside config_base."""

    site: str  # "<path>::<enclosing scopes>.<name>", e.g. "jfe_jax/models/layers.py::RMSNorm.eps"
    line: int
    kind: str  # field | parameter | get | config

    def __str__(self) -> str:
        path, _, rest = self.site.partition("::")
        return f"{path}:{self.line}: {rest} ({self.kind})"


def _config_base_aliases(tree: ast.Module) -> set[str]:
    """Names that stand for config_base in a module: the module imported under a name, names
    imported from it, and module-level names assigned from an expression using one of those."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "jfe_jax.train":
            aliases |= {a.asname or a.name for a in node.names if a.name == "config_base"}
        elif isinstance(node, ast.ImportFrom) and node.module == CONFIG_BASE_MODULE:
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == CONFIG_BASE_MODULE and a.asname}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            if _reads_config_base(node.value, aliases):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                aliases |= {t.id for t in targets if isinstance(t, ast.Name)}
    return aliases


def _reads_config_base(expr: ast.expr, aliases: set[str]) -> bool:
    """Whether ``expr`` refers to config_base (one of ``aliases``, or ``jfe_jax.train.config_base``
    spelt out)."""
    for node in ast.walk(expr):
        if isinstance(node, ast.Name) and node.id in aliases:
            return True
        if isinstance(node, ast.Attribute) and node.attr == "config_base":
            return True
    return False


def _is_none(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is None


def _parameter_defaults(args: ast.arguments) -> list[tuple[str, ast.expr]]:
    """(parameter name, default) for every parameter that has a default."""
    positional = [*args.posonlyargs, *args.args]
    with_defaults = positional[len(positional) - len(args.defaults) :]
    pairs = [(a.arg, d) for a, d in zip(with_defaults, args.defaults)]
    pairs += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return pairs


def _config_target(target: ast.expr, section: str) -> str | None:
    """The option name of an assignment target ``<x>.<section>.<name>`` or
    ``<x>.<section>["<name>"]``, else None."""
    if isinstance(target, ast.Attribute):
        owner, name = target.value, target.attr
    elif isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
        owner, name = target.value, target.slice.value
    else:
        return None
    if isinstance(owner, ast.Attribute) and owner.attr == section and isinstance(name, str):
        return name
    return None


def defaults_in_source(
    source: str, where: str, names: Iterable[str], *, section: str
) -> list[Default]:
    """Every place in one module's ``source`` that declares or defaults one of ``names``
    (module docstring), ``section`` being the config section that holds them (``model``)."""
    names = set(names)
    tree = ast.parse(source)
    aliases = _config_base_aliases(tree)
    found = []

    def report(scopes: list[str], name: str, node: ast.AST, kind: str) -> None:
        site = f"{where}::{'.'.join([*scopes, name])}"
        found.append(Default(site, node.lineno, kind))

    def visit(node: ast.AST, scopes: list[str]) -> None:
        if isinstance(node, ast.ClassDef):
            for statement in node.body:
                if (
                    isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)
                    and statement.target.id in names
                    and statement.value is not None
                    and not _reads_config_base(statement.value, aliases)
                ):
                    report([*scopes, node.name], statement.target.id, statement, "field")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            scope = [*scopes, getattr(node, "name", "<lambda>")]
            for name, default in _parameter_defaults(node.args):
                if name in names and not _is_none(default):
                    if not _reads_config_base(default, aliases):
                        report(scope, name, default, "parameter")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            first = node.args[0] if node.args else None
            has_default = len(node.args) > 1 or any(k.arg == "default" for k in node.keywords)
            if (
                node.func.attr == "get"
                and isinstance(first, ast.Constant)
                and first.value in names
                and has_default
            ):
                report(scopes, first.value, node, "get")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = _config_target(target, section)
                if name in names:
                    report(scopes, name, node, "config")
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            scopes = [*scopes, node.name]
        for child in ast.iter_child_nodes(node):
            visit(child, scopes)

    visit(tree, [])
    return sorted(found, key=lambda d: (d.site.partition("::")[0], d.line, d.site))


def _exempted(site: str, key: str) -> bool:
    """Whether the exemption ``key`` covers ``site``: the same site, a scope above it
    (``path::Class``), a whole module (``path``) or a folder (``path/``)."""
    path, _, scope = site.partition("::")
    if key.endswith("/"):
        return path.startswith(key)
    if "::" not in key:
        return path == key
    return site == key or site.startswith(key + ".")


def defaults_outside_config_base(
    names: Iterable[str], *, section: str, exempt: Mapping[str, str] = {}
) -> list[Default]:
    """Every place in the package but config_base that declares or defaults one of ``names``
    (module docstring) and that no key of ``exempt`` (site, scope, module or folder -> why)
    covers."""
    names = tuple(names)
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == CONFIG_BASE:
            continue
        where = path.relative_to(ROOT.parent).as_posix()
        found += defaults_in_source(path.read_text(encoding="utf-8"), where, names, section=section)
    return [d for d in found if not any(_exempted(d.site, key) for key in exempt)]


def unused_exemptions(
    names: Iterable[str], *, section: str, exempt: Mapping[str, str]
) -> list[str]:
    """The keys of ``exempt`` that cover nothing ``defaults_outside_config_base`` finds."""
    found = defaults_outside_config_base(names, section=section)
    return [key for key in exempt if not any(_exempted(d.site, key) for d in found)]


# ----------------------------------------------------------------------------- the options

# Building blocks whose fields share an option's name but are not that option: the callers
# hand each one its value (a layer's ``dtype`` is whatever its module runs in, not
# ``model.dtype``), and their defaults serve the tests and MIRe that build them alone.
ENCODER_EXEMPT = {
    "jfe_jax/models/layers.py::Linear": (
        "a generic leaf layer: dtype/param_dtype/lora_* are its caller's, every caller passes them"
    ),
    "jfe_jax/models/layers.py::RMSNorm": "a generic leaf layer: its dtype is its caller's",
    "jfe_jax/models/layers.py::LayerNorm": "a generic leaf layer: its dtype is its caller's",
    "jfe_jax/models/mire/": (
        "MIRe's modules (a separate model with its own CLIP/ColBERT settings), not the "
        "one-tower encoder's options"
    ),
    # Not the options, only their names:
    "jfe_jax/encoder.py::Encoder.save_pretrained.dtype": (
        "the dtype of the files written (float32 unless asked), not the compute dtype"
    ),
    "jfe_jax/models/hf_io.py::export_hf_tensors": (
        "writes the tensors it is given: dtype is the files', lora_alpha the merge scale of "
        "any adapters present (0.0: none); Encoder.save_pretrained passes its options"
    ),
    "jfe_jax/models/hf_io.py::save_hf_checkpoint": "as export_hf_tensors, which it calls",
    "jfe_jax/train/aot.py::_export_side.spec.dtype": "a ShapeDtypeStruct's dtype",
}
OPTIMIZER_EXEMPT = {
    "jfe_jax/demo.py::set_steps.warmup_steps": (
        "a run's value derived at runtime from the steps asked for (at most a tenth of "
        "them), not a default"
    ),
    "jfe_jax/train/checkpoint.py::restore_params.trainable": (
        "the saved train state's trainable subtree, not optimizer.trainable"
    ),
    "jfe_jax/models/one_tower.py::l2_normalize.eps": "the norm's floor, not Adam's epsilon",
    "jfe_jax/models/layers.py::RMSNorm.eps": "the norm's epsilon, not Adam's (from the config)",
    "jfe_jax/models/layers.py::LayerNorm.eps": "the norm's epsilon, not Adam's",
}


def encoder_option_names() -> tuple[str, ...]:
    from jfe_jax.models.one_tower import EncoderOptions

    return tuple(f.name for f in dataclasses.fields(EncoderOptions))


def optimizer_option_names() -> tuple[str, ...]:
    from jfe_jax.train.config_base import base_config

    return tuple(base_config().optimizer.keys())


def test_encoder_options_are_declared_only_in_config_base():
    found = defaults_outside_config_base(
        encoder_option_names(), section="model", exempt=ENCODER_EXEMPT
    )
    assert not found, "encoder options declared outside config_base:\n" + "\n".join(map(str, found))


def test_optimizer_options_are_declared_only_in_config_base():
    found = defaults_outside_config_base(
        optimizer_option_names(), section="optimizer", exempt=OPTIMIZER_EXEMPT
    )
    assert not found, "optimizer options declared outside config_base:\n" + "\n".join(
        map(str, found)
    )


def test_every_exemption_still_covers_something():
    stale = unused_exemptions(encoder_option_names(), section="model", exempt=ENCODER_EXEMPT)
    stale += unused_exemptions(
        optimizer_option_names(), section="optimizer", exempt=OPTIMIZER_EXEMPT
    )
    assert not stale, f"exemptions that cover nothing (remove them): {stale}"


def test_every_encoder_option_is_in_config_base_with_the_same_default():
    from jfe_jax.models.one_tower import EncoderOptions
    from jfe_jax.train.config_base import base_config

    model = base_config().model
    options = EncoderOptions()
    missing = [f.name for f in dataclasses.fields(EncoderOptions) if f.name not in model]
    assert not missing, f"EncoderOptions fields with no model.<name> in config_base: {missing}"
    differ = {
        f.name: (getattr(options, f.name), model[f.name])
        for f in dataclasses.fields(EncoderOptions)
        if getattr(options, f.name) != model[f.name]
    }
    assert not differ, f"EncoderOptions default != config_base model default: {differ}"


def test_encoder_options_from_config_reads_each_field_and_defaults_one_a_run_lacks():
    from jfe_jax.models.one_tower import EncoderOptions
    from jfe_jax.train.config_base import base_config

    model = base_config().model
    model.lora_rank, model.lora_targets, model.remat = 8, ["q_proj", "v_proj"], "full"
    options = EncoderOptions.from_config(model)
    assert (options.lora_rank, options.lora_targets, options.remat) == (
        8,
        ("q_proj", "v_proj"),
        "full",
    )
    saved = model.to_dict()  # a run config written before attention_impl existed
    del saved["attention_impl"]
    assert EncoderOptions.from_config(saved).attention_impl == EncoderOptions().attention_impl
    assert EncoderOptions.layout_fields() == (
        "scan_layers",
        "remat",
        "temperature",
        "attention_impl",
    )


def test_the_scan_finds_each_kind_of_declaration_and_allows_config_base_reads():
    source = (
        "from jfe_jax.train import config_base\n"
        "_DEFAULTS = config_base.DEFAULTS.model\n"
        "class Options:\n"
        "    rank: int = 0\n"  # field
        "    alpha: float = _DEFAULTS.alpha\n"  # reads config_base: allowed
        "    dtype: str\n"  # no value: allowed
        "def make(*, rank=4, alpha=None, eps=config_base.DEFAULTS.optimizer.eps):\n"  # one
        "    return lambda rank=2: rank\n"  # parameter of a lambda
        "def read(config):\n"
        "    config.model.rank = 3\n"  # config
        "    config.model['alpha'] = 1.0\n"  # config
        "    config.data.rank = 3\n"  # another section: not this one
        "    return config.model.get('rank', 0), config.model.get('alpha')\n"  # one get
    )
    found = defaults_in_source(source, "m.py", ("rank", "alpha", "eps"), section="model")
    assert [(d.site, d.line, d.kind) for d in found] == [
        ("m.py::Options.rank", 4, "field"),
        ("m.py::make.rank", 7, "parameter"),
        ("m.py::make.<lambda>.rank", 8, "parameter"),
        ("m.py::read.rank", 10, "config"),
        ("m.py::read.alpha", 11, "config"),
        ("m.py::read.rank", 13, "get"),
    ]
    assert _exempted("m.py::Options.rank", "m.py::Options")
    assert _exempted("m.py::Options.rank", "m.py")
    assert not _exempted("m.py::OptionsB.rank", "m.py::Options")


# ----------------------------------------------------------------------------- the data side

# The places that default a data option's name but are another setting; ItemFormat's own
# defaults read config_base (DEFAULTS, and QWEN2_VL_DEFAULTS where a model directory without a
# format gets Qwen2-VL's inference settings, not training's).
DATA_EXEMPT = {
    "jfe_jax/encoder.py::Encoder.embed.pack_vision": (
        "Encoder.embed's own switch (on: the same embeddings for less vision work, its row "
        "count rounded to a few shapes), not data.pack_vision, which is off for training "
        "because its vision rows follow each batch unless pack_vision_row_fraction fixes them"
    ),
}
# How ItemFormat and BatchLayout fields read a training config: "<section>.<option>" for
# the options (the same name in data unless listed), None for what is not an option (the
# model's patch sizes, mean and std; the rows and chunks a run's devices and hosts give).
FIELD_OPTIONS = {
    "ItemFormat": {
        "min_pixels": "data.image_min_pixels",
        "max_pixels": "data.image_max_pixels",
        "fusion": "model.fusion",
        **dict.fromkeys(
            ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        ),
    },
    "BatchLayout": dict.fromkeys(("row_multiple", "chunk_items")),
}


def _field_names() -> dict[str, tuple[str, ...]]:
    from jfe_jax.data.batch_layout import BatchLayout
    from jfe_jax.data.item_format import ItemFormat

    classes = (ItemFormat, BatchLayout)
    return {c.__name__: tuple(f.name for f in dataclasses.fields(c)) for c in classes}


def _field_options() -> dict[str, dict[str, str | None]]:
    """Each field's option (FIELD_OPTIONS), ``data.<field>`` where it lists none."""
    return {
        kind: {name: FIELD_OPTIONS[kind].get(name, f"data.{name}") for name in names}
        for kind, names in _field_names().items()
    }


def item_format_and_layout_option_names() -> tuple[str, ...]:
    """The fields of ItemFormat and BatchLayout that are options of config_base's data section
    under the same name."""
    from jfe_jax.train.config_base import base_config

    data = base_config().data
    names = (name for names in _field_names().values() for name in names)
    return tuple(name for name in dict.fromkeys(names) if name in data)


def test_item_format_and_batch_layout_options_declared_once():
    names = item_format_and_layout_option_names()
    assert {"prompt", "length_buckets", "max_length", "pack", "pack_vision"} <= set(names)
    found = defaults_outside_config_base(names, section="data", exempt=DATA_EXEMPT)
    assert not found, "data options declared outside config_base:\n" + "\n".join(map(str, found))
    found = defaults_outside_config_base(("fusion",), section="model")  # ItemFormat.fusion
    assert not found, "model.fusion declared outside config_base:\n" + "\n".join(map(str, found))
    stale = unused_exemptions(names, section="data", exempt=DATA_EXEMPT)
    assert not stale, f"exemptions that cover nothing (remove them): {stale}"


def test_every_item_format_and_batch_layout_field_is_an_option_or_listed():
    from jfe_jax.train.config_base import base_config

    config = base_config()
    unknown = {
        f"{kind}.{name}": option
        for kind, fields in _field_options().items()
        for name, option in fields.items()
        if option is not None and option.split(".")[1] not in config[option.split(".")[0]]
    }
    assert not unknown, f"fields whose option is not in config_base (list them): {unknown}"
    # pack is the item format's (one declaration); a layout says how, not whether, to pack.
    assert "pack" in _field_names()["ItemFormat"] and "pack" not in _field_names()["BatchLayout"]


def _stage2_configs() -> dict:
    import importlib.util

    from jfe_jax.train import config_base

    path = ROOT.parent / "configs" / "stage2_demo.py"
    spec = importlib.util.spec_from_file_location("stage2_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    changed = config_base.stage2_config("2b")  # every option read, away from its default
    d = changed.data
    d.prompt, d.length_buckets, d.max_length = "In one word:", (512, 32, 96), 384
    d.truncate_text, d.query_patch_budget, d.candidate_patch_budget = True, 0, 320
    d.image_min_pixels, d.image_max_pixels = 28 * 28, 224 * 224
    d.pack, d.pack_items_per_row, d.pack_length = True, 3, 640
    d.pack_vision, d.pack_vision_blocks = True, (16, 64)
    late = config_base.stage2_config("2b")
    late.model.fusion, late.data.pack, late.data.pack_vision_row_fraction = "late", False, 0.5
    return {
        "configs/stage2_demo.py": demo.get_config(),
        "stage2_config('2b')": config_base.stage2_config("2b"),
        "stage2_config('2b'), every option changed": changed,
        "stage2_config('2b'), late fusion": late,
    }


def _resolved(config, option: str):
    """What a field holds of ``option``: its value, 0 lengths as the largest bucket (what
    from_train_config and batch_layout resolve), sequences as sorted / plain tuples."""
    section, name = option.split(".")
    value = config[section][name]
    if name in ("max_length", "pack_length"):
        return value or max(config.data.length_buckets)
    if name == "length_buckets":
        return tuple(sorted(value))
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_item_format_and_batch_layout_of_a_training_config_hold_its_values():
    from jfe_jax.data.item_format import ItemFormat
    from jfe_jax.models.sizes import get_size
    from jfe_jax.train.setup import batch_layout

    for where, config in _stage2_configs().items():
        built = {
            "ItemFormat": ItemFormat.from_train_config(config, get_size(config.model.size).vision),
            "BatchLayout": batch_layout(config, local_shards=2, hosts=1),
        }
        differ = {
            f"{kind}.{name}": (getattr(built[kind], name), option, _resolved(config, option))
            for kind, fields in _field_options().items()
            for name, option in fields.items()
            if option is not None and getattr(built[kind], name) != _resolved(config, option)
        }
        assert not differ, f"{where}: fields != their options (field, option, value): {differ}"
