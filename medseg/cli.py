"""The ``medseg`` command line: thin Typer commands over :mod:`medseg.workflows`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from medseg.errors import (
    BundleError,
    Terminated,
    describe_config_failure,
    describe_memory_failure,
    describe_os_failure,
    find_user_error,
    show_user_error_logs,
)


class _FlagHelp:
    """``--help`` is an on/off flag: shown without a value placeholder, like the commands' own flags."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_FlagHelp, TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # --debug is the group's option, but errors say "--debug shows the traceback" after any command: take it
        # there too (not after "--", where arguments are the command's own)
        cut = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:cut]:
            args = ["--debug", *[a for a in args[:cut] if a != "--debug"], *args[cut:]]
        return super().parse_args(ctx, args)


class _Command(_FlagHelp, TyperCommand):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # an empty value is an unset shell variable, never meant: as a path it would be the current folder
        # (an empty --set value, KEY=, is a value; after "--", "--x=" is an argument)
        takes_value = {name for p in self.params if not getattr(p, "is_flag", True)
                       for name in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        cut = args.index("--") if "--" in args else len(args)
        for k, arg in enumerate(args):
            option, equals, value = arg.partition("=")
            if arg.strip() and not (k < cut and arg.startswith("--") and equals and not value.strip()):
                continue
            if arg.startswith("--"):
                what = f"{option} is given an empty value"
            elif k and args[k - 1] in takes_value:
                what = f"{args[k - 1]} is given an empty value"
            else:
                what = f"argument {k + 1} after '{ctx.info_name}' is empty"
            typer.secho(f"error: {what}; give it a value (an unset shell variable?)", err=True, fg=typer.colors.RED)
            raise typer.Exit(1)
        return super().parse_args(ctx, args)


app = typer.Typer(
    help="Train, evaluate and apply biomedical segmentation bundles (MONAI bundle format).",
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _home(value: Any) -> Any:
    """A path option's leading ``~`` or ``~/`` as the home folder, as the shell does not expand it after
    ``--output=``; other names (``~results``, a folder of that name) are kept as given."""
    if isinstance(value, list):
        return [_home(v) for v in value]
    if value is None:
        return None
    text = str(value)
    return Path(os.path.expanduser(text)) if text == "~" or text.startswith("~/") else Path(value)


BundleArg = Annotated[Path, typer.Argument(
    metavar="BUNDLE", callback=_home,
    help="Bundle folder: bundles/isbi_em, bundles/jurkat, bundles/nuclei or your own.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda or cuda:N.")]
OverlayOpt = Annotated[
    list[Path] | None,
    typer.Option("--config", "-c", callback=_home,
                 help="Overlay config merged over the bundle's (repeatable); every key must be a config id.",
                 metavar="FILE"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: KEY=VALUE, nested keys joined by '#' (repeatable).",
                 metavar="KEY=VALUE"),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.", metavar="")]
CheckpointOpt = Annotated[list[Path] | None, typer.Option(
    callback=_home,
    help="Weights (default: BUNDLE/models/model.pt); the settings its training changed (network, object size, "
         "...) are taken from the config.json beside it unless given here. Repeat it to run several trainings of "
         "the bundle's network as one ensemble, their outputs averaged.",
    metavar="PATH",
)]
TtaOpt = Annotated[bool | None, typer.Option(
    "--tta/--no-tta",
    help="Average the 8 rotations/flips (8 network passes per slice); default: the bundle's tta (on for jurkat, "
         "and for nuclei in evaluate and infer).",
    show_default=False, metavar="")]


def _run(ctx: typer.Context, fn: Callable[..., Any], *args: Any, interrupted: str | Callable[[], str] = "",
         **kwargs: Any) -> Any:
    """Call ``fn``; report user errors as one line and exit 1 (``--debug`` re-raises for the traceback).

    Ctrl-C ends with one line too (``interrupted``, or what it returns then, says how to continue) and exit code
    130; SIGTERM, taken as Ctrl-C, with 143.
    """
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        with _sigterm_as_ctrl_c(), _quiet_tifffile(not debug), _lenient_dicom(not debug):
            return fn(*args, **kwargs)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        how = str(stop) or (interrupted() if callable(interrupted) else interrupted)  # the workflow may say best
        typer.secho(f"error: interrupted{'; ' + how if how else ''}", err=True, fg=typer.colors.RED)
        raise typer.Exit(143 if isinstance(stop, Terminated) else 130) from None
    except Exception as err:  # noqa: BLE001 - the CLI boundary turns every failure into one line
        if debug:
            raise
        user = find_user_error(err)
        message = str(user) if user else (describe_os_failure(err) or describe_memory_failure(err, ctx.info_name)
                                          or describe_config_failure(err)
                                          or f"internal error: {type(err).__name__}: {err} (rerun with --debug)")
        typer.secho(f"error: {message.splitlines()[0] if message else type(err).__name__}", err=True,
                    fg=typer.colors.RED)
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _quiet_tifffile(quiet: bool) -> Iterator[None]:
    """tifffile logs what it finds wrong in a file as it reads past it or before it raises; what matters is the
    readers' own one-line error (a file that cannot be read, a chain of pages that breaks), so the log is kept
    for ``--debug``."""
    logger = logging.getLogger("tifffile")
    before = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _lenient_dicom(lenient: bool) -> Iterator[None]:
    """pydicom checks the values it reads against their value representation (a date that is not one, a UID
    with letters) and says so in its log and as a warning: clinical series often carry such values, and the
    ones medseg uses are checked where they are used (a UID that cannot name an output). So the commands
    read DICOM without those messages; ``--debug`` keeps them."""
    if not lenient:
        yield
        return
    from pydicom import config

    before = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = before


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a batch scheduler ending the job) stops a command as Ctrl-C does, so
    that it keeps its finished work and says how to go on, instead of dying mid-file."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _overrides(pairs: list[str] | None, given: dict[str, tuple[Any, str]] | None = None,
               **named: Any) -> dict[str, Any]:
    """The ``--set`` pairs as overrides, ``named`` (id -> value of a named option, None if not given) added.

    A ``--set`` of an id that a named option also sets, to another value, is refused rather than one of the
    two winning silently; ``given`` lists such options the command applies itself: id -> (value, option).
    """
    from medseg.bundle import parse_override

    result = {k: v for k, v in named.items() if v is not None}
    options = {k: (v, f'{ {"max_epochs": "--epochs"}.get(k, k)} {v}') for k, v in result.items()}
    options.update({k: v for k, v in (given or {}).items() if v[0] is not None})
    for text in pairs or []:
        key, value = parse_override(text)
        named_id = key.replace("::", "#").rsplit("#", 1)[-1]  # train#trainer#max_epochs: where @max_epochs goes
        reference = named_id != key and isinstance(value, str) and value.startswith(("@", "$"))
        if named_id in options and options[named_id][0] != value and not reference:
            raise BundleError(f"--set {text} contradicts {options[named_id][1]}; give one of them")
        result[key] = value
    return result


def _tta_option(tta: bool | None) -> str:
    return "--tta" if tta else "--no-tta"


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.", metavar="")] = False,
) -> None:
    ctx.obj = {"debug": debug}
    show_user_error_logs(debug)
    if not debug:  # MLflow's notes on setting up a new local store are not the user's concern
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


@app.command(cls=_Command)
def train(
    ctx: typer.Context,
    bundle: BundleArg,
    data: Annotated[Path, typer.Option(callback=_home, help=(
        "Labelled data folder in the bundle's layout: isbi_em image/ + label/ or ISBI TIFF stacks; jurkat "
        "images + masks (image_glob, mask_template); nuclei DSB 2018 {id}/images + {id}/masks, or images/ + "
        "masks/ instance label images."))],
    output: Annotated[Path, typer.Option(callback=_home, help="Run folder: checkpoints, curves, split, MLflow store.")
                      ] = Path("runs/latest"),
    val_data: Annotated[Path | None, typer.Option(callback=_home, help=(
        "A folder of labelled images, laid out as --data, that validates (picks model.pt) while all of --data "
        "trains (default: part of --data is held out; --set val_dir=DIR is the same)."))] = None,
    device: DeviceOpt = "auto",
    epochs: Annotated[int | None, typer.Option(help="Override max_epochs.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop training after this many minutes.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --output, with the run's own "
                                              "settings (overlay and --set values, unless given again) and split, "
                                              "and, unless --epochs is given, to its own length.", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option(help=(
        "Replace a trained run in --output (its checkpoints, model.pt, history, curves; the MLflow store keeps "
        "it). Without it, or --resume, a folder holding trained weights is refused; a config.json, split.json, "
        "history.json, train_summary.json or curves.png no training wrote is never replaced."), metavar="")] = False,
    tracking: Annotated[bool, typer.Option("--tracking/--no-tracking", help="Log the run to MLflow.",
                                           metavar="")] = True,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking server/URI (default: MLFLOW_TRACKING_URI if set, else a "
                                      "SQLite store in --output; with --resume, the store the run was started "
                                      "with).")
    ] = None,
    config: OverlayOpt = None,
    set_: SetOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Train a bundle; the best weights are written to OUTPUT/model.pt."""
    from medseg import workflows

    summary = _run(ctx, lambda: workflows.train(
        str(bundle), str(data), str(output), device=device, overlays=tuple(map(str, config or [])),
        overrides=_overrides(set_, max_epochs=epochs), resume=resume, overwrite=overwrite, tracking=tracking,
        tracking_uri=tracking_uri, max_minutes=max_minutes, progress=progress,
        say=lambda line: typer.echo(line, err=True), val_dir=None if val_data is None else str(val_data)))
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    if summary.get("best_metric") is not None:
        typer.echo(f"best {summary['key_metric']} {summary['best_metric']:.4f} at epoch "
                   f"{summary['best_metric_epoch']}: {Path(summary['output_dir']) / 'model.pt'}")


@app.command(cls=_Command)
def evaluate(
    ctx: typer.Context,
    bundle: BundleArg,
    data: Annotated[Path, typer.Option(callback=_home, help="Labelled data folder.")],
    checkpoint: CheckpointOpt = None,
    output: Annotated[Path | None, typer.Option(
        callback=_home,
        help="Where metrics.csv and summary.json go (default: eval, or eval_ensemble, beside the first checkpoint).",
    )] = None,
    split: Annotated[str | None, typer.Option(help=(
        "Images to score: val (the training run's validation split; for a training with --val-data, its "
        "validation folder), train (its training images) or all; default: val."))] = None,
    tta: TtaOpt = None,
    overwrite: Annotated[bool, typer.Option(help=(
        "Replace the report of another evaluation in --output (other checkpoints, data, split, tta or settings), "
        "or files of its names that medseg did not write (default: refused; the same evaluation's report is "
        "replaced)."), metavar="")] = False,
    device: DeviceOpt = "auto",
    tracking: Annotated[bool, typer.Option("--tracking/--no-tracking", help=(
        "Log the scores and the report to the MLflow run of the checkpoint's training, where it was tracked "
        "(metrics named after the --output folder: eval/v_rand, ...)."), metavar="")] = True,
    config: OverlayOpt = None,
    set_: SetOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Score a checkpoint with the bundle's metrics (ISBI V_rand/V_info, per-class Dice/IoU, DSB 2018 score)."""
    from medseg import workflows

    ckpts = _run(ctx, lambda: workflows.checkpoint_list(checkpoint, bundle))
    out = output or workflows.evaluation_dir(ckpts)
    kept = f" (the one already in {out} is kept as it was)" if (Path(out) / "summary.json").is_file() else ""
    summary = _run(ctx, lambda: workflows.evaluate(
        str(bundle), str(data), ckpts, str(out), split=split, tta=tta, device=device,
        overlays=tuple(map(str, config or [])), overrides=_overrides(set_, {"tta": (tta, _tta_option(tta))}),
        progress=progress, overwrite=overwrite, tracking=tracking),
        interrupted=f"no report written{kept}; run it again to score")
    typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    typer.echo(f"per-image metrics: {out / 'metrics.csv'}; summary: {out / 'summary.json'}")


@app.command(cls=_Command)
def infer(
    ctx: typer.Context,
    bundle: BundleArg,
    input_path: Annotated[Path, typer.Argument(
        metavar="INPUT", callback=_home,
        help="Folder (searched recursively) or one file: PNG, TIFF (stacks), BMP, JPEG, NIfTI, NRRD, MetaImage, "
             "DICOM (one input per series).")],
    output_dir: Annotated[Path, typer.Argument(
        metavar="OUTPUT_DIR", callback=_home,
        help="Receives mask/REL.*, prob/REL.*, table/REL.csv (instance bundles), manifest.csv and run.json.")],
    checkpoint: CheckpointOpt = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Only files matching this glob (relative path or name, e.g. '*.nii.gz'); repeatable.",
        metavar="GLOB")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Leave out files matching this glob; repeatable.",
                                                      metavar="GLOB")] = None,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Search sub-folders.",
                                            metavar="")] = True,
    overwrite: Annotated[bool, typer.Option(help=(
        "Redo inputs whose outputs exist, also another model's, and remove another model's outputs of "
        "another kind for them, as it wrote them (default: skip those the same run made from the input as it "
        "is now; resuming another checkpoint's or other settings' folder is an error)."),
        metavar="")] = False,
    format_: Annotated[str, typer.Option("--format", help=(
        "Mask format: auto (the input's own kind: PNG, TIFF, NIfTI, NRRD, MetaImage; DICOM SEG for binary "
        "masks of DICOM), png, tiff, nifti, dicom-seg, nrrd or metaimage (.mha)."
    ))] = "auto",
    prob: Annotated[bool, typer.Option("--prob/--no-prob", help=(
        "Also write float32 probability maps (the class, or 1 - background for multi-class bundles)."),
        metavar="")] = True,
    tta: TtaOpt = None,
    device: DeviceOpt = "auto",
    config: OverlayOpt = None,
    set_: SetOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Segment every image under INPUT slice by slice; a bad file is reported and skipped (exit 1).

    For a model trained with object-size normalisation (target_diameter), --set diameter=PIXELS gives a known
    object size.
    """
    from medseg import workflows

    summary = _run(ctx, lambda: workflows.infer(
        str(bundle), str(input_path), str(output_dir), checkpoint, tta=tta, device=device,
        overlays=tuple(map(str, config or [])), progress=progress, overrides=_overrides(set_, {
            "tta": (tta, _tta_option(tta)), "save_prob": (None if prob else False, "--no-prob"),
            "output_format": (None if format_ == "auto" else format_, f"--format {format_}")}),
        include=tuple(include or ()), exclude=tuple(exclude or ()), recursive=recursive, overwrite=overwrite,
        output_format=format_, save_prob=prob),
        interrupted=lambda: ((f"finished inputs are kept in {output_dir}; " + (
            "run the same command again to redo every input (--overwrite redoes those done too)" if overwrite
            else "run the same command again to do the rest")) if _rows_in(output_dir / "manifest.csv") else
            "no input was finished; run the same command again"))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2, ensure_ascii=False))
    for message in summary["failures"]:
        typer.secho(f"failed: {message}", err=True, fg=typer.colors.RED)
    if summary["failed"]:
        typer.secho(f"error: {summary['failed']} of {summary['inputs']} inputs failed; the others are done "
                    f"(see {summary['manifest']})", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


def _rows_in(manifest: Path) -> bool:
    """Whether a batch's ``manifest.csv`` lists an input done (segmented, or skipped as done before): not only
    files ignored (of other types) or failed."""
    import csv

    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            return any(row.get("status") in ("ok", "skipped") for row in csv.DictReader(f))
    except (OSError, ValueError, csv.Error):
        return False


@app.command(cls=_Command)
def export(
    ctx: typer.Context,
    bundle: BundleArg,
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", callback=_home,
                                               help="The trained weights: a run's model.pt.")],
    output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT_DIR", callback=_home,
                                               help="The new bundle folder (must not exist).")],
    torchscript: Annotated[bool, typer.Option(
        "--torchscript/--no-torchscript",
        help="Also write models/model.ts, the network as TorchScript (about the size of model.pt again).",
        metavar="")] = True,
    weights_url: Annotated[str | None, typer.Option(
        help="The address of the folder the weight files will be uploaded to: large_files.yml lists them there "
             "with their SHA-256, for the MONAI model zoo and `python -m monai.bundle download_large_files`.",
        metavar="URL")] = None,
) -> None:
    """Write a trained model as a bundle of its own, to hand over or share.

    OUTPUT_DIR gets BUNDLE with CHECKPOINT as models/model.pt, the run's config.json and split.json beside it,
    and the settings the training changed written into the configs, so that plain `python -m monai.bundle run`
    runs and evaluates the model as medseg does. Its metadata.json and docs describe these weights: channels,
    best validation score, settings changed, SHA-256. models/model.ts holds the network as TorchScript, for
    plain PyTorch (torch.jit.load) and MONAI Deploy, unless --no-torchscript, or a warning says this PyTorch
    cannot script the network. With --weights-url, large_files.yml says where the weight files will be kept,
    so that the bundle can be shared without them, as the MONAI model zoo keeps bundles.
    """
    from medseg.export import export_bundle

    written = _run(ctx, export_bundle, bundle, checkpoint, output_dir, torchscript=torchscript,
                   weights_url=weights_url)
    typer.echo(json.dumps(written, indent=2, ensure_ascii=False, default=str))


@app.command(cls=_Command)
def info(
    ctx: typer.Context,
    bundles_dir: Annotated[Path, typer.Option(
        callback=_home, help="Where to look for bundles (default: ./bundles, else those that come with medseg).")
    ] = Path("bundles"),
) -> None:
    """Print versions, the compute device and the available bundles."""
    from medseg.bundle import shipped_bundles
    from medseg.info import collect_info

    given = getattr(ctx.get_parameter_source("bundles_dir"), "name", "") == "COMMANDLINE"
    shipped = shipped_bundles()
    if not given and not bundles_dir.is_dir() and shipped is not None:  # run from another folder
        bundles_dir = shipped
    if given and not bundles_dir.is_dir():  # the default is looked for quietly: info still reports the versions
        typer.secho(f"error: {bundles_dir}: folder not found; pass --bundles-dir pointing to the folder that holds "
                    "the bundles (isbi_em, jurkat, nuclei)", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    found = _run(ctx, collect_info, bundles_dir)
    typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
    if not found["bundles"]:
        fix = ("it is a bundle itself: pass its parent folder" if (bundles_dir / "configs" / "metadata.json").is_file()
               else "pass --bundles-dir pointing to the folder that holds the bundles (isbi_em, jurkat, nuclei)")
        typer.secho(f"note: no bundles in {bundles_dir}; {fix}", err=True)


def main() -> None:
    """Console entry point."""
    app(prog_name="medseg")


if __name__ == "__main__":
    sys.exit(main())
