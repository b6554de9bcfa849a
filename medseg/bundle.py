"""Locate a MONAI bundle, merge its configs with overlays and overrides, and check checkpoints against it."""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from medseg.errors import BundleError, CheckpointError, ConfigValueError, brief

#: medseg workflow -> the bundle config files merged for it, in order (MONAI model-zoo convention).
WORKFLOW_CONFIGS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "evaluate": ("train", "evaluate"),
    "infer": ("inference",),
}

_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

#: The prefixes of config values MONAI works out rather than takes as written: an expression, a reference to
#: another id, a macro (``monai.bundle.utils`` EXPR_KEY, ID_REF_KEY, MACRO_KEY)
_WORKED_OUT = ("$", "@", "%")


#: What MONAI rewrites inside a plain text value too: '#' (its old id separator), relative ids ('@::', '%::')
_REWRITTEN = re.compile(r"#|[@%]::")


def literal(text: str) -> str:
    """``text`` (a path, a name) as a config value that MONAI parses back to ``text`` itself.

    MONAI reads a value that starts with ``$``, ``@`` or ``%`` as an expression, a reference or a macro, and
    rewrites ``#`` anywhere in a value, so a folder named ``$HOME``, ``@out`` or ``res#1`` was run as Python,
    looked up, or became another folder (``res::1``). Such a text is given as an expression of one string
    literal, those characters escaped (``$'res\\x231'``); other texts are kept as they are.
    """
    if not (text.startswith(_WORKED_OUT) or _REWRITTEN.search(text)):
        return text
    body = repr(text)
    for char in "#@$%":
        body = body.replace(char, f"\\x{ord(char):02x}")
    return "$" + body


def literal_items(value: Any, keep_worked_out: bool = False) -> Any:
    """Data (samples: mappings and lists of paths and names) to be put into a config, every text in it a
    :func:`literal`; with ``keep_worked_out``, texts that start as an expression, reference or macro stay one
    (a ``--set`` value)."""
    if isinstance(value, str):
        return value if keep_worked_out and value.startswith(_WORKED_OUT) else literal(value)
    if isinstance(value, dict):
        return {k: literal_items(v, keep_worked_out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal_items(v, keep_worked_out) for v in value]
    return value


def written(value: Any) -> Any:
    """The text a :func:`literal` value stands for (the value itself when it is not one)."""
    if isinstance(value, str) and value.startswith(("$'", '$"')):
        import ast

        try:
            text = ast.literal_eval(value[1:])
        except (ValueError, SyntaxError):
            return value
        if isinstance(text, str):
            return text
    return value


def worked_out(value: Any) -> bool:
    """Whether a config value is an expression, a reference or a macro, which MONAI resolves when it parses
    (a :func:`literal` text is not: it stands for itself)."""
    return isinstance(value, str) and value.startswith(_WORKED_OUT) and written(value) is value


def _find_config(folder: Path, name: str) -> Path | None:
    for suffix in _CONFIG_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _read_configs(parser: Any, files: list[Path], meta: Path | None = None) -> None:
    """Read ``meta`` and merge ``files`` into ``parser``; a file that does not parse is named in the error."""
    from monai.bundle import ConfigParser

    for path in ([meta] if meta is not None else []) + list(files):
        try:
            ConfigParser.load_config_file(str(path))
        except (ValueError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BundleError(f"{path}: cannot read config ({reason}); fix its JSON/YAML syntax") from err
    if meta is not None:
        _check_names(meta, ConfigParser.load_config_file(str(meta)))
        parser.read_meta(meta)
    parser.read_config([str(f) for f in files])


def _check_names(path: Path, meta: Any) -> None:
    """Refuse a ``metadata.json`` without the bundle's name and version, which outputs and run records carry."""
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: not a JSON object; a bundle's metadata.json holds its name, version and the "
                          "other fields of MONAI's metadata schema")
    problems = [f"{k} {json.dumps(meta[k])} is not a text" if meta.get(k) is not None and not isinstance(meta[k], str)
                else f"no {k}" for k in ("name", "version") if not (isinstance(meta.get(k), str) and meta[k].strip())]
    if problems:
        raise BundleError(f"{path}: {' and '.join(problems)}; give the bundle's \"name\" and \"version\" "
                          "(e.g. \"0.1.0\") there, as MONAI's metadata schema asks")


def shipped_bundles() -> Path | None:
    """The folder of the bundles that come with medseg (``bundles/`` beside the package, in a checkout installed
    editable); ``None`` where this install has none."""
    folder = Path(__file__).resolve().parent.parent / "bundles"
    return folder if folder.is_dir() else None


def _where_bundles_are(root: Path) -> str:
    """The end of the error for a bundle path ``root`` that is not there: where it was looked for (a relative
    path reads from the current folder), and where the bundles that come with medseg are."""
    here = f" (looked for at {root.absolute()})" if not root.is_absolute() else ""
    shipped = shipped_bundles()
    if shipped is not None and (shipped / root.name / "configs" / "metadata.json").is_file():
        return f"{here}; the bundles that come with medseg are in {shipped}: give {shipped / root.name}"
    return f"{here}; give a bundle folder such as {shipped / 'isbi_em' if shipped else 'bundles/isbi_em'}"


def bundle_configs(bundle: str | os.PathLike, workflow: str) -> list[Path]:
    """The config files of ``bundle`` that ``workflow`` merges.

    Raises:
        BundleError: ``bundle`` is not a bundle folder, or lacks a config the workflow needs.
    """
    root = Path(bundle)
    meta = root / "configs" / "metadata.json"
    if not root.exists():
        raise BundleError(f"{root}: bundle folder not found{_where_bundles_are(root)}")
    if not meta.is_file():
        raise BundleError(
            f"{root}: not a bundle (no configs/metadata.json); give a bundle folder such as bundles/isbi_em"
        )
    files = []
    for name in WORKFLOW_CONFIGS[workflow]:
        path = _find_config(root / "configs", name)
        if path is None:
            raise BundleError(f"{root}: no configs/{name}.json; the bundle cannot {workflow}")
        files.append(path)
    return files


def default_config(bundle: str | os.PathLike, workflow: str) -> dict[str, Any]:
    """The config content ``workflow`` of ``bundle`` holds as shipped (no overlay, setting or override)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    _read_configs(parser, bundle_configs(bundle, workflow))
    return parser.get()


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` (VALUE as JSON when it parses, else a string); nested keys use ``#``.

    Raises:
        BundleError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise BundleError(f"override '{text}' has no '='; write KEY=VALUE, e.g. max_epochs=20")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _check_overlay_keys(bundle: str | os.PathLike, workflow: str, files: list[Path],
                        overlays: list[str | os.PathLike] | tuple) -> dict[str, Any]:
    """Every key of an overlay must be one the bundle's ``workflow`` configs have, so none is silently unused,
    and its value of a kind the bundle's can take.

    Returns:
        Values to set after the overlays are merged: a number YAML read as a word (``1e-4``, YAML 1.1 wants
        ``1.0e-4``) where the bundle has a number; in a YAML file also where it has ``null``, a reference or
        expression, or a list of numbers (:func:`_yaml_numbers`).
    """
    from monai.bundle import ConfigParser

    base = ConfigParser()
    _read_configs(base, files)
    fixes: dict[str, Any] = {}
    for overlay in overlays:
        try:
            content = ConfigParser.load_config_file(str(overlay))
        except Exception as err:  # noqa: BLE001 - json and yaml raise their own kinds for a malformed file
            reason = brief(err) or type(err).__name__
            raise BundleError(f"{overlay}: cannot read config ({reason}); fix its JSON/YAML syntax") from err
        if not isinstance(content, dict):
            raise BundleError(f"{overlay}: an overlay must hold a mapping of config ids to values")
        for key, value in content.items():
            if str(key).lstrip("+") not in base:
                raise BundleError(
                    f"{overlay}: '{key}' is not a config id of {Path(bundle).name}'s {workflow} configs, so this "
                    f"overlay does not apply to it; leave it out for this bundle and command")
            default = base[str(key).lstrip("+")]
            if isinstance(default, dict) and "_target_" in default and isinstance(value, dict) \
                    and "_target_" not in value and not str(key).startswith("+"):
                first = next(iter(value), "channels")
                raise BundleError(
                    f"{overlay}: '{key}' replaces the bundle's whole {key}, and the new one names no _target_; to "
                    f"change a part of it, give that part alone, e.g. '{key}#{first}'")
            if isinstance(value, str) and not worked_out(value) \
                    and isinstance(default, (int, float)) and not isinstance(default, bool):
                try:
                    number = float(value)
                    if isinstance(default, int):  # a count (max_epochs: 2e0 is 2); a fraction is not one
                        if not number.is_integer():
                            raise ValueError(value)
                        number = int(number)
                    fixes[str(key)] = number
                except (ValueError, OverflowError):
                    kind = "a whole number" if isinstance(default, int) else "a number"
                    raise BundleError(f"{overlay}: {key}: {value!r} is not {kind}, and the bundle's {key} is "
                                      f"({default!r}); give {kind}") from None
                continue
            if str(overlay).lower().endswith((".yaml", ".yml")) and not str(key).startswith("+"):
                numbers = _yaml_numbers(value, default)  # 1e-2 where the bundle's value is not a number itself
                if numbers is not value:
                    fixes[str(key)] = numbers
    return fixes


#: A number YAML 1.1 reads as a word: an exponent without a decimal point (``1e-4``, ``3e0``)
_YAML_WORD_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_numbers(value: Any, default: Any) -> Any:
    """``value`` with the numbers YAML read as words made numbers where the bundle's ``default`` is ``null``, a
    reference or expression (``optimizer#lr: "@learning_rate"``), or a list of numbers (the same object when
    there are none)."""
    computed = isinstance(default, str) and default.startswith(("@", "$"))
    if (default is None or computed) and isinstance(value, str) and _YAML_WORD_NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list) and isinstance(default, list) and default and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
        items = [float(v) if isinstance(v, str) and _YAML_WORD_NUMBER.fullmatch(v.strip()) else v for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


#: Config ids the commands set from their own arguments, never from ``--set``.
ARGUMENT_IDS = ("bundle_root", "dataset_dir", "input_dir", "output_dir", "ckpt_path")
#: The parts of components that say where a command reads its data and weights or writes its results
#: (``validate#handlers#1#save_dir``): they follow the arguments, never a ``--set`` of their own.
PLACE_KEYS = (*ARGUMENT_IDS, "save_dir", "save_to", "data_dir", "load_path", "key_metric_filename")


def load_config(
    bundle: str | os.PathLike,
    workflow: str,
    overlays: list[str | os.PathLike] | tuple = (),
    overrides: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    trained: dict[str, Any] | None = None,
) -> Any:
    """Build a :class:`monai.bundle.ConfigParser` for ``workflow`` of ``bundle``.

    The bundle's configs are merged with ``overlays`` (files, e.g. from ``configs/``), then ``trained`` (the
    checkpoint's training values, as config content: see :func:`medseg.runfolder.training_settings`),
    ``settings`` (run-time values medseg sets, such as ``dataset_dir``) and ``overrides`` (the user's
    ``--set KEY=VALUE``) are applied. Overrides and every key of an overlay must name an existing key, so a
    typo, or an overlay written for another bundle, is not silently ignored.

    Raises:
        BundleError: bad bundle, missing overlay, or an override or overlay key naming an unknown key.
    """
    from monai.bundle import ConfigParser

    files = bundle_configs(bundle, workflow)
    for overlay in overlays:
        if not Path(overlay).is_file():
            raise BundleError(f"{overlay}: overlay config not found; see configs/ for the available ones")
    fixes = _check_overlay_keys(bundle, workflow, files, overlays) if overlays else {}
    if overlays and settings:
        _check_overlay_places(overlays, device="device" in settings)
    files += [Path(overlay) for overlay in overlays]
    parser = ConfigParser()
    _read_configs(parser, files, meta=Path(bundle) / "configs" / "metadata.json")
    for key, value in fixes.items():
        parser[key] = value
    before = {key: parser[key] for key in overrides or {} if key in parser}  # the bundle's, for the type check
    if trained:
        import copy

        for key, value in trained.items():
            parser[key] = copy.deepcopy(value)  # a --set part below changes the parser's copy only
        _overlay_parts_again(parser, overlays, trained)
    for key in overrides or {}:  # an id of the bundle, or of a component the training's values put in its place
        if key not in before and key not in parser:
            raise BundleError(_unknown_key_message(parser, key, bundle))
        holder = key.replace("::", "#").rpartition("#")[0]
        if holder and holder in parser and not isinstance(parser[holder], (dict, list)):
            raise BundleError(f"--set {key}: {holder} is {written(parser[holder])!r} here (from the training's "
                              f"config.json), which has no parts; give the whole {holder} with --set")
    taken = [k for k in overrides or {} if k in ARGUMENT_IDS and settings]
    if taken:  # the command's own arguments: a --set would send part of the work elsewhere
        raise BundleError(f"--set {taken[0]}: the command sets it from its arguments (the bundle, data or input "
                          "folder, output folder, --checkpoint); give it there instead")
    if "device" in (overrides or {}) and "device" in (settings or {}):  # else --device would silently lose
        raise BundleError(f"--set device: {_DEVICE_RULE}; give --device instead")
    placed = [k for k in overrides or {} if "#" in k and k.rsplit("#", 1)[1] in PLACE_KEYS and settings]
    placed += [found for k, v in (overrides or {}).items() if settings and (found := _literal_place(v, k))]
    if placed:  # a component's own folder or file: results elsewhere than the output folder, over other files
        raise BundleError(f"--set {placed[0]}: {_PLACE_RULE}{_PLACE_HINT if placed[0] not in overrides else ''}")
    parser["bundle_root"] = literal(str(Path(bundle)))
    for key, value in (settings or {}).items():
        parser[key] = literal(value) if key.endswith(("_dir", "_path")) and isinstance(value, str) else value
    for key, value in (overrides or {}).items():
        default = parser[key] if key in parser else before.get(key)
        value = _check_override_type(key, _referenced(parser, default), value)
        # a text (a mask template, a folder, a class name) keeps its '#'; one meant as an expression, reference
        # or macro starts with '$', '@' or '%'
        parser[key] = literal_items(value, keep_worked_out=True)
    _check_patch_size(parser)
    check_classes(parser, names=workflow != "infer")  # inference scores nothing: its class names go unused
    if workflow == "train":  # evaluate and infer do not batch training crops
        check_batch_size(parser)
    return parser


#: Why ``device`` may not be set: the command's choice, which also decides mixed precision and what is recorded
_DEVICE_RULE = ("the command sets it from --device (auto, cpu, cuda or cuda:N), which also decides mixed "
                "precision and what the run records")


def _check_overlay_places(overlays: list | tuple, device: bool = False) -> None:
    """An overlay, like ``--set``, may not give the ids a command takes from its arguments (:data:`ARGUMENT_IDS`,
    and ``device`` where the command sets it), nor a component's own folder or file (:data:`PLACE_KEYS`): the
    command's arguments would silently win over the first, and the second would send results elsewhere than the
    output folder."""
    from monai.bundle import ConfigParser

    for overlay in overlays:
        content = ConfigParser.load_config_file(str(overlay)) or {}
        for key, value in content.items():
            plain = str(key).lstrip("+").replace("::", "#")
            given = [plain] + ([f"{plain}#{part}" for part in value]
                               if str(key).startswith("+") and isinstance(value, dict) else [])
            for item in given:
                if device and item == "device":
                    raise BundleError(f"{overlay}: sets device; {_DEVICE_RULE}; leave it out of the overlay")
                if item in ARGUMENT_IDS:
                    raise BundleError(f"{overlay}: sets {item}, which the command sets from its arguments (the "
                                      "bundle, data or input folder, output folder, --checkpoint); leave it out of "
                                      "the overlay and give it there")
                if "#" in item and item.rsplit("#", 1)[1] in PLACE_KEYS:
                    raise BundleError(f"{overlay}: sets {item}; {_PLACE_RULE}; leave it out of the overlay")
            found = _literal_place(value, plain)
            if found:
                raise BundleError(f"{overlay}: sets {found}; {_PLACE_RULE}{_PLACE_HINT}")


#: Why a component's own folder or file (:data:`PLACE_KEYS`) may not be set.
_PLACE_RULE = ("where the command reads and writes follows its arguments (the data or input folder, the output "
               "folder, --checkpoint), not a setting of one component")
#: How a component given whole names the command's folders: by reference, not by a path of its own.
_PLACE_HINT = "; refer to the command's folder instead, as the bundle does (\"save_dir\": \"@output_dir\")"


def _by_reference(key: str, value: str) -> bool:
    """Whether a place ``value`` follows the command's folders: a reference (``@output_dir``), an expression of
    one (``$@output_dir + '/x'``), or, for ``key_metric_filename``, a bare file name (the bundles' ``model.pt``)."""
    return value.startswith("@") or (value.startswith("$") and "@" in value) or (
        key == "key_metric_filename" and "/" not in value and os.sep not in value and value not in ("", ".", ".."))


def _literal_place(value: Any, where: str) -> str:
    """The id, inside ``value`` given whole at ``where`` (a handler, a list of handlers), of a folder or file of a
    component's own (:data:`PLACE_KEYS`) given as a literal path, not by reference to the command's (``@output_dir``,
    ``$@output_dir + '/x'``); ``""`` when there is none."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return ""
    for key, part in items:
        if str(key) in PLACE_KEYS and isinstance(part, str) and not _by_reference(str(key), part):
            return f"{where}#{key}"
        found = _literal_place(part, f"{where}#{key}")
        if found:
            return found
    return ""


def _overlay_parts_again(parser: Any, overlays: list | tuple, trained: dict[str, Any]) -> None:
    """Set again what the overlays give inside the training's values just put in place (a part of a component
    the training gave whole: ``postprocess#min_area``, ``postprocess::min_area`` or ``+postprocess``), so
    that an overlay's part is applied over them as a ``--set`` part is."""
    from monai.bundle import ConfigParser

    for overlay in overlays:
        content = ConfigParser.load_config_file(str(overlay))
        for key, value in (content or {}).items():
            plain = str(key).lstrip("+").replace("::", "#")
            for whole in trained:
                if plain.startswith(whole + "#"):
                    parser[plain] = value
                elif str(key).startswith("+") and plain == whole and isinstance(value, dict) \
                        and isinstance(parser[whole], dict):
                    for part, part_value in value.items():
                        parser[f"{whole}#{part}"] = part_value


def config_flag(value: Any, name: str) -> bool:
    """A yes/no setting as a bool. ``python -m monai.bundle run ... --tta false`` hands the word over as a
    string, which ``bool()`` would take as true: the words true/false (yes/no, on/off, 1/0) are read as
    meant, anything else is refused."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0", ""):
            return False
        raise ConfigValueError(f"{name}={value!r}: give true or false")
    return bool(value)


def _referenced(parser: Any, default: Any, hops: int = 5) -> Any:
    """The literal a default such as ``"@max_epochs"`` refers to (a plain reference, followed a few hops)."""
    while hops and isinstance(default, str) and default.startswith("@") and default[1:] in parser:
        default, hops = parser[default[1:]], hops - 1
    return default


def _check_override_type(key: str, default: Any, value: Any) -> Any:
    """A ``--set`` value of another kind than the bundle's literal default (a word for a number, a fraction for
    a whole number, ...): refused; the value to use (``3.0`` for a whole number becomes ``3``)."""
    if value is None or worked_out(value):
        return value  # null (often "off"), an expression or a reference: checked where it is used
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a whole number"
        if ok and isinstance(value, float):
            ok, value = value.is_integer(), int(value) if value.is_integer() else value
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, dict)) and isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        # JSON that did not parse (a bracket missing): it would reach the bundle as a string
        kind = "a list" if isinstance(default, list) else "a mapping"
        example = json.dumps(default)
        example = f", e.g. --set '{key}={example}'" if len(example) <= 80 else ""
        raise ConfigValueError(f"--set {key}={value}: not valid JSON, and the bundle's {key} is {kind}; give it "
                               f"as JSON{example}")
    else:
        return value  # strings, lists, dicts, null and expressions take what the bundle makes of them
    if not ok:
        raise ConfigValueError(f"--set {key}={value!r}: the bundle's {key} is {kind} ({default!r}); give {kind}")
    return value


def _check_patch_size(parser: Any) -> None:
    """``patch_size`` (training crops and inference windows) must fit the network: each side a multiple of the
    bundle's ``size_divisor`` (2 to the number of the U-Net's down-samplings)."""
    patch, divisor = parser.get("patch_size"), parser.get("size_divisor")
    if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 1 or not isinstance(patch, list):
        return
    if all(isinstance(side, int) and not isinstance(side, bool) and side > 0 and side % divisor == 0
           for side in patch):
        return
    fit = [max(divisor, round(side / divisor) * divisor) if isinstance(side, (int, float)) else divisor
           for side in patch]
    raise ConfigValueError(f"patch_size={patch}: each side must be a positive multiple of size_divisor {divisor} "
                           f"(what the network's down-sampling needs); e.g. --set 'patch_size={fit}', or for a "
                           "network with other strides --set size_divisor=N (2 to the number of its down-samplings)")


def check_classes(parser: Any, names: bool = True) -> None:
    """The bundle's ``class_names``, ``regions`` and ``object_classes`` checked against ``num_classes``
    (:func:`medseg.metrics.check_classes`), before a training or scoring starts: evaluate would refuse them
    only after a whole training. ``names=False`` checks ``object_classes`` alone (inference). Ids a bundle does
    not have, or that do not work out here, are left alone; the parser's parse cache is left empty."""
    from medseg.metrics import check_classes as check

    if "num_classes" not in parser:
        return
    keys = ("num_classes", "class_names", "regions", "object_classes") if names else ("num_classes", "object_classes")
    values = {}
    try:
        for key in keys:
            if key in parser:
                values[key] = parser.get_parsed_content(key, instantiate=False)
    except Exception:  # noqa: BLE001 - an expression that fails says so where it is used
        return
    finally:
        parser.ref_resolver.reset()  # what was parsed here unbuilt must not be what the command builds
    if isinstance(values["num_classes"], int) and not isinstance(values["num_classes"], bool):
        check(values["num_classes"], values.get("class_names"), values.get("regions"), values.get("object_classes"))


def check_batch_size(parser: Any) -> None:
    """Where a batch is made of whole images' crops (``batch_size // samples_per_image`` images, nuclei),
    ``batch_size`` below ``samples_per_image`` would be zero images."""
    if not str(parser.get("train#dataloader#batch_size", "")).replace(" ", "").endswith("//@samples_per_image"):
        return
    batch, per_image = parser.get("batch_size"), parser.get("samples_per_image")
    if isinstance(batch, int) and isinstance(per_image, int) and 0 < per_image and batch < per_image:
        raise ConfigValueError(f"batch_size={batch} is below samples_per_image={per_image}: a batch holds whole "
                               f"images' {per_image} crops each; set --set batch_size={per_image} (or a multiple), "
                               "or fewer samples_per_image")


def _unknown_key_message(parser: Any, key: str, bundle: str | os.PathLike) -> str:
    """The error for ``key``, which ``parser`` lacks, with the ids it may have meant: the near names of its first
    missing part (``netwrk_def#channels``: ``network_def#channels``), else of its last part where the first
    missing one holds it (``dataloader#num_workers``: ``num_workers``)."""
    parts = key.split("#")
    depth = max((i for i in range(len(parts)) if i == 0 or "#".join(parts[:i]) in parser), default=0)
    parent = "#".join(parts[:depth])
    scope = parser[parent] if parent else parser.get()
    options = [str(k) for k in scope if not str(k).startswith("_")] if isinstance(scope, dict) else []
    ids = ["#".join([*parts[:depth], c, *parts[depth + 1:]]) for c in difflib.get_close_matches(parts[depth], options)]
    close = [i for i in ids if i in parser]
    if not close and len(parts) > depth + 1:  # the missing part holds the rest: the last part's near names here
        close = ["#".join([*parts[:depth], c]) for c in difflib.get_close_matches(parts[-1], options)]
    hint = f"did you mean {', '.join(close[:3])}?" if close else (
        f"it is not an id of this command's config; nested keys are joined by '#', e.g. {_nested_example(parser)}")
    return f"unknown config key '{key}' for bundle {bundle}; {hint}"


def _nested_example(parser: Any) -> str:
    """A nested id that this config really has (``inferer#overlap``, ``train#trainer#max_epochs``, ...)."""
    config = parser.get()
    for preferred in ("train#trainer#max_epochs", "inferer#overlap", "validate#inferer#overlap"):
        if preferred in parser:
            return preferred
    for key, value in config.items():
        if isinstance(value, dict) and not str(key).startswith("_"):
            child = next((c for c in value if not str(c).startswith("_")), None)
            if child is not None:
                return f"{key}#{child}"
    return "network_def#channels"


def load_checkpoint(network: Any, path: str | os.PathLike, device: Any = "cpu", training_state: bool = True) -> str:
    """Load weights from ``path`` into ``network`` safely (``weights_only``) and strictly.

    Accepts a plain state dict or a dict holding it under ``"ema_model"`` (a training's last checkpoint: the
    weights it validated, averaged with ``ema_momentum``) or ``"model"``; without ``training_state``, a file
    that also holds an ``"optimizer"`` or ``"trainer"`` (a last checkpoint) is refused. The digest and
    the weights come from one open file, so the digest is that of the weights loaded even when the file is
    replaced meanwhile (a training still running into the folder writes a new file and renames it over the old
    one).

    Returns:
        The hex SHA-256 of the bytes loaded.

    Raises:
        CheckpointError: the file is missing, unreadable, or its weights do not fit ``network``.
    """
    import pickle

    import torch

    from medseg.io import stream_sha256

    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path}: not a file (a folder, or a pipe); give --checkpoint the model.pt of a "
                              "training (medseg train writes OUTPUT/model.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; give --checkpoint the model.pt of a training "
                              "(medseg train writes OUTPUT/model.pt)")
    try:
        with open(path, "rb") as f:
            digest = stream_sha256(f)
            f.seek(0)
            with warnings.catch_warnings():  # a TorchScript file: refused below in one line
                warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
                state = torch.load(f, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for files that are not checkpoints
        if isinstance(err, pickle.UnpicklingError) and "unsupported global" in str(err).lower():
            # e.g. a whole pickled model, which a safe load refuses to run
            raise CheckpointError(
                f"{path}: holds pickled objects, not only weights; save the weights alone with "
                "torch.save(model.state_dict(), PATH)") from err
        if "torchscript" in str(err).lower():
            raise CheckpointError(f"{path}: a TorchScript model, not a checkpoint of weights; pass the model.pt of "
                                  "a medseg training (or save the scripted model's state_dict())") from err
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in text:  # torch's advice to load unsafely is not ours to give
            text = "not a file of weights only"
        detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
        detail = brief(detail)  # torch's messages run long
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail}); "
                              "pass the model.pt of a medseg training") from err
    if not training_state and isinstance(state, dict) and any(k in state for k in ("optimizer", "trainer")):
        raise CheckpointError(f"{path}: a training's last checkpoint (its weights with the optimizer's state); "
                              "give the run's model.pt, the weights it validated best")
    if isinstance(state, dict) and isinstance(state.get("ema_model"), dict):
        state = state["ema_model"]  # a last checkpoint: the weights validated (the average, with ema_momentum)
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of weights; "
                              "pass the model.pt of a medseg training")
    broken = next((k for k, v in state.items()
                   if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:  # a diverged training's weights: every output would be NaN
        raise CheckpointError(f"{path}: weight {broken} holds NaN or infinite values (the training diverged); "
                              "use another checkpoint, or train again with a lower learning rate")
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        recorded = path.parent / "config.json"
        recorded = recorded if recorded.is_file() else Path(path).resolve().parent / "config.json"  # via a link
        hint = (f"; the settings they were trained with are recorded in {recorded}: compare its network_def and "
                "the ids it refers to with the values given here" if recorded.is_file() else "")
        raise CheckpointError(
            f"{path}: weights do not fit this bundle's network ({_state_dict_mismatch(err)}); "
            f"use a checkpoint trained with this bundle or change network_def to match{hint}"
        ) from err
    return digest


def _state_dict_mismatch(err: RuntimeError) -> str:
    """The first difference that ``load_state_dict`` reports, in a few words."""
    text = str(err)
    size = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                     r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if size:
        name, saved, expected = size.groups()
        return f"{name} is {saved} in the checkpoint and {expected} in the network"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[^\"]+\"(?:, )?){1,3})", text)
    if keys:
        kind = "missing from the checkpoint" if keys.group(1) == "Missing" else "not in the network"
        return f"{kind}: {keys.group(2).rstrip(', ')}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
    return brief(detail)


def validate_metadata(bundle: str | os.PathLike) -> dict[str, Any]:
    """Check ``configs/metadata.json`` against the schema kept in medseg (works offline).

    The version must also be the newest entry of the changelog.

    Raises:
        BundleError: missing file, schema violation, or a version without a changelog entry.
    """
    import jsonschema

    path = Path(bundle) / "configs" / "metadata.json"
    if not path.is_file():
        raise BundleError(f"{path}: not found; a bundle needs configs/metadata.json")
    meta = json.loads(path.read_text(encoding="utf-8"))
    schema = json.loads((Path(__file__).parent / "schemas" / "metadata.schema.json").read_text(encoding="utf-8"))
    try:
        jsonschema.validate(meta, schema)
    except jsonschema.ValidationError as err:
        where = "/".join(map(str, err.absolute_path)) or "top level"
        raise BundleError(f"{path}: {where}: {err.message}") from err
    if meta["version"] not in meta["changelog"]:
        raise BundleError(f"{path}: version {meta['version']} has no changelog entry; add one")
    return meta
