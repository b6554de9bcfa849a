"""Time `medseg infer` against plain MONAI inference with the same weights, in one run.

Each side does the whole job per image: read the file, scale intensities, run the bundle's network, softmax,
and write a float32 probability TIFF and an 8-bit mask PNG. Two plain MONAI sides (isbi_em only, whose
preprocessing is one percentile scaling a user writes in two lines):

- `sliding_window_inference` with the bundle's window, overlap, Gaussian blending and logit shift;
- one window of the whole image (`roi_size` the image's size rounded up to the network's multiple), which is
  what a MONAI user can do too for images that fit.

medseg mirror-pads the borders and, for images up to `whole_max_pixels`, runs one whole-image pass instead of
windows; it closes cell contours (`close_contours`, timed on and off) and with `--tta` averages the 8
dihedral transforms (a cost of its own: no plain side does 8 passes). medseg's rows include its per-run setup
(config, network, checkpoint, run record), which the plain sides do before their timers start.

The sides run in turn, `--repeats` times (interleaved, so that other load on the machine falls on all of
them); the script prints each side's median images/s with its range, CPU seconds (this process's, all its
threads), and how closely the masks agree. `--bundle` times another bundle's `medseg infer` with and without
TTA (no plain side; `--glob '*/images/*.png'` picks DSB samples for nuclei).

    python benchmarks/infer_speed.py --data ../shared/data/isbi2012/test --checkpoint runs/em1/model.pt
    python benchmarks/infer_speed.py --bundle bundles/jurkat --data ../shared/data/cells3class/dataset1 \\
        --glob '*.bmp' --checkpoint runs/jurkat/model.pt

With a checkpoint, the script checks that the sides segment alike: the plain sides against medseg without
closed contours (the same network on the same pixels but the borders) on 98 % of pixels, else it exits with an
error after printing its table; each side with TTA against it without on 95 %, else a warning (weights trained
for a few epochs are unsure of many pixels, which TTA moves: 82 % after 2 epochs of jurkat).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from common import SHARED_DATA, cpu_name, positive_int
from monai.inferers import sliding_window_inference
from PIL import Image

from medseg import workflows
from medseg.bundle import load_checkpoint, load_config
from medseg.runfolder import training_settings

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# below this, the masks of medseg and plain MONAI (trained weights, no contour closing) differ by more than
# medseg's mirror-padded borders explain
AGREEMENT_EXPECTED = 0.98
# below this, the masks with and without TTA (trained weights) differ by more than averaging 8 passes explains
TTA_AGREEMENT_EXPECTED = 0.95


def plain_monai(files: list[Path], out: Path, network: torch.nn.Module, cfg: dict, device: torch.device,
                roi: tuple[int, int] | None = None) -> None:
    """The straightforward MONAI way: a loop over files with `sliding_window_inference` (``roi``: one window
    of at least the image's size instead of the bundle's)."""
    (out / "prob").mkdir(parents=True, exist_ok=True)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    network.eval()
    for path in files:
        img = np.asarray(Image.open(path).convert("F"), dtype=np.float32)
        lo, hi = np.percentile(img, (0.5, 99.5))
        img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)
        x = torch.from_numpy(img)[None, None].to(device)
        # on CUDA with autocast, as MONAI's own evaluators run with amp (and medseg infer does)
        with torch.no_grad(), torch.autocast("cuda", enabled=device.type == "cuda"):
            logits = sliding_window_inference(x, roi or cfg["patch_size"], cfg["sw_batch_size"], network,
                                              overlap=cfg["overlap"], mode="gaussian")
        shift = torch.as_tensor(cfg["logit_shift"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        logits = logits.float() + shift
        prob = torch.softmax(logits, 1)[0, 1].cpu().numpy().astype(np.float32)
        tifffile.imwrite(out / "prob" / f"{path.stem}.tif", prob)
        Image.fromarray(((prob > 0.5) * 255).astype(np.uint8)).save(out / "mask" / f"{path.stem}.png")


def whole_image_roi(files: list[Path], multiple: int) -> tuple[int, int]:
    """The smallest window that holds every image whole, in multiples of the network's downsampling."""
    sizes = np.array([Image.open(f).size[::-1] for f in files])
    return tuple(int(-(-s // multiple) * multiple) for s in sizes.max(0))


def timed(fn, *args) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def agreement(files: list[Path], a: Path, b: Path) -> float:
    """The fraction of pixels where the masks of two sides agree, over all images: their labels, or for
    16-bit masks (instance ids, which two sides may number differently) whether a pixel is foreground."""
    same = []
    for f in files:
        x = np.asarray(Image.open(a / "mask" / f"{f.stem}.png"))
        y = np.asarray(Image.open(b / "mask" / f"{f.stem}.png"))
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            x, y = x > 0, y > 0
        same.append(float((x == y).mean()))
    return float(np.mean(same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=BUNDLES / "isbi_em")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "isbi2012" / "test",
                        help="a folder of images (default: the ISBI test slices beside the repository)")
    parser.add_argument("--glob", default="*", help="which files under --data (default: those in it)")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: a seeded, untrained network, whose "
                        "timings of the closed contours and agreement figures mean little)")
    parser.add_argument("--limit", type=positive_int, default=30, help="number of images")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs of each side, in turn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true", help="also time medseg infer --tta")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    files = sorted(p for p in args.data.glob(args.glob) if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not p.name.startswith("."))[: args.limit]
    if not files:
        raise SystemExit(f"error: no {'/'.join(s[1:].upper() for s in SUFFIXES)} images match "
                         f"{args.data / args.glob}")
    if len({f.name for f in files}) < len(files):
        raise SystemExit(f"error: {args.data / args.glob} matches files of the same name in several folders; "
                         "give a --glob that picks one of each")
    plain = args.bundle.resolve() == (BUNDLES / "isbi_em").resolve()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    try:
        subset, first = work / "in", work / "first"
        subset.mkdir()
        first.mkdir()
        for f in files:
            shutil.copy(f, subset / f.name)
        shutil.copy(files[0], first / files[0].name)
        ckpt = args.checkpoint
        sides = {}
        if plain:
            # the network and window the checkpoint was trained with (its run's config.json), as medseg infer
            # reads them
            trained = training_settings(args.bundle, [ckpt], {}).values if ckpt else {}
            cfg = load_config(args.bundle, "infer", trained=trained)
            net = cfg.get_parsed_content("network_def").to(device)
            if ckpt is None:
                torch.manual_seed(0)
                ckpt = work / "model.pt"
                torch.save(net.state_dict(), ckpt)
            load_checkpoint(net, ckpt, device)  # as medseg infer loads it (a last checkpoint's averaged weights)
            window = {k: cfg.get_parsed_content(k) for k in ("patch_size", "sw_batch_size", "overlap", "logit_shift")}
            strides = cfg.get_parsed_content("network_def#strides", default=[2, 2, 2, 2])
            roi = whole_image_roi(files, int(np.prod(strides)))
            patch = "×".join(map(str, window["patch_size"]))
            sides[f"plain MONAI sliding_window_inference ({patch} windows)"] = (
                lambda out, src: plain_monai(src, out, net, window, device), "plain")
            sides[f"plain MONAI, one {'×'.join(map(str, roi))} window"] = (
                lambda out, src: plain_monai(src, out, net, window, device, roi=roi), "plain_whole")
        elif ckpt is None:
            raise SystemExit("error: --checkpoint is needed for a bundle other than isbi_em")

        def medseg(tta: bool = False, close: bool | None = None):
            overrides = {} if close is None else {"close_contours": close}

            def run(out: Path, src: list[Path]) -> None:
                workflows.infer(str(args.bundle), str(subset if len(src) > 1 else first), str(out), str(ckpt),
                                tta=tta, device=args.device, progress=False, overrides=overrides)
            return run

        if plain:
            sides["medseg infer (default: closed contours)"] = (medseg(close=True), "medseg")
            sides["medseg infer -s close_contours=false"] = (medseg(close=False), "medseg_open")
        else:
            sides["medseg infer --no-tta"] = (medseg(), "medseg")
        if args.tta or not plain:
            sides["medseg infer --tta (8 passes; no plain equivalent)"] = (medseg(tta=True), "medseg_tta")

        for run, key in sides.values():  # warm-up, one image each
            run(work / "warm" / key, files[:1])
        walls = {name: [] for name in sides}
        cpus = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, (run, key) in sides.items():
                out = work / f"{key}{r}"
                wall, cpu = timed(run, out, files)
                walls[name].append(wall)
                cpus[name].append(cpu)
                if r:
                    shutil.rmtree(out)
        n = len(files)
        baseline = next(iter(sides))
        median = {name: statistics.median(t) for name, t in walls.items()}
        agree = {}
        # what must segment alike: the plain sides and medseg without closed contours (the same network on
        # the same pixels but the borders), and each side with TTA and without
        expected = {}
        for name, (_, key) in sides.items():
            if plain and key in ("plain", "plain_whole"):
                label = f"{name} vs medseg -s close_contours=false"
                agree[label] = agreement(files, work / f"{key}0", work / "medseg_open0")
                expected[label] = AGREEMENT_EXPECTED, True  # below it, an error
            elif key == "medseg_tta":
                label = f"{name} vs {'medseg infer (default)' if plain else 'medseg infer --no-tta'}"
                agree[label] = agreement(files, work / f"{key}0", work / "medseg0")
                expected[label] = TTA_AGREEMENT_EXPECTED, False  # a warning: weights trained briefly fall below
        result = {
            "bundle": args.bundle.name,
            "images": n,
            "image_size": list(np.asarray(Image.open(files[0])).shape),
            "device": str(device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": cpu_name(),
            "weights": str(args.checkpoint) if args.checkpoint else "untrained (seed 0)",
            "repeats": args.repeats,
            "seconds_median": {k: round(v, 2) for k, v in median.items()},
            "seconds_all": {k: [round(t, 2) for t in v] for k, v in walls.items()},
            "cpu_seconds_median": {k: round(statistics.median(v), 2) for k, v in cpus.items()},
            "images_per_second": {k: round(n / v, 3) for k, v in median.items()},
            "ratio_vs_first_row": {k: round(median[baseline] / v, 3) for k, v in median.items()},
            "mask_pixel_agreement": {k: round(v, 5) for k, v in agree.items()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.bundle.name}: {n} images of {result['image_size']} on {device} ({result['torch_threads']} "
          f"threads, torch {torch.__version__}, {result['machine']}), weights: {result['weights']}, "
          f"median of {args.repeats} interleaved runs")
    print(f"| {'method':<55} | {'images/s':>8} | {'range':>13} | {'CPU s':>7} | {'speed vs first':>14} |")
    print(f"|{'-' * 57}|{'-' * 10}|{'-' * 15}|{'-' * 9}|{'-' * 16}|")
    for k in sides:
        fastest, slowest = n / min(walls[k]), n / max(walls[k])
        print(f"| {k:<55} | {result['images_per_second'][k]:>8.2f} | {slowest:>5.2f}–{fastest:<7.2f} | "
              f"{result['cpu_seconds_median'][k]:>7.1f} | {result['ratio_vs_first_row'][k]:>13.2f}x |")
    for k, v in agree.items():
        print(f"masks agree on {100 * v:.2f}% of pixels: {k}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.checkpoint:
        print("note: untrained weights: the agreement figures mean little, and so does the time of closing the "
              "contours, which depends on the map; give --checkpoint (`make bench` takes `make demo`'s)")
        return
    apart = [k for k, v in agree.items() if v < expected[k][0]]
    for k in apart:
        if not expected[k][1]:  # weights trained briefly are unsure of many pixels, which TTA moves
            print(f"WARNING: {k} agree on {100 * agree[k]:.2f}% of pixels, under {100 * expected[k][0]:.0f}%: "
                  "expected of weights trained briefly, a fault of the TTA path for trained ones")
    apart = [k for k in apart if expected[k][1]]
    if apart:
        raise SystemExit("error: the sides do not segment alike, so their timings are not comparable: "
                         + "; ".join(f"{k} agree on {100 * agree[k]:.2f}% of pixels, under "
                                     f"{100 * expected[k][0]:.0f}%" for k in apart))


if __name__ == "__main__":
    main()
