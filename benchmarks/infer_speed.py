"""Time `medseg infer` against plain MONAI `sliding_window_inference` with the same weights, in one run.

Both sides do the whole job per image: read the file, scale intensities, run the bundle's network, softmax,
and write a float32 probability TIFF and an 8-bit mask PNG. The plain side uses `sliding_window_inference`
with the bundle's window, overlap, Gaussian blending and logit shift; medseg mirror-pads the borders and, for images up
to `whole_max_pixels`, runs one whole-image pass instead of windows (with --tta, the 8 dihedral transforms
are averaged) and closes cell contours (`close_contours`, timed on and off). The script prints images/s per
side, the ratio, and how closely the two masks agree.

    python benchmarks/infer_speed.py --data ../shared/data/isbi2012/test --checkpoint runs/em1/model.pt
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.inferers import sliding_window_inference
from PIL import Image

from medseg import workflows
from medseg.bundle import load_checkpoint, load_config
from medseg.runfolder import training_settings

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "isbi_em"


def plain_monai(files: list[Path], out: Path, network: torch.nn.Module, cfg: dict, device: torch.device) -> None:
    """The straightforward MONAI way: a loop over files with `sliding_window_inference`."""
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
            logits = sliding_window_inference(x, cfg["patch_size"], cfg["sw_batch_size"], network,
                                              overlap=cfg["overlap"], mode="gaussian")
        shift = torch.as_tensor(cfg["logit_shift"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        logits = logits.float() + shift
        prob = torch.softmax(logits, 1)[0, 1].cpu().numpy().astype(np.float32)
        tifffile.imwrite(out / "prob" / f"{path.stem}.tif", prob)
        Image.fromarray(((prob > 0.5) * 255).astype(np.uint8)).save(out / "mask" / f"{path.stem}.png")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/isbi2012/test"))
    parser.add_argument("--checkpoint", type=Path, help="weights (default: a seeded, untrained network)")
    parser.add_argument("--limit", type=int, default=30, help="number of images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true", help="also time medseg infer --tta")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))[: args.limit]
    if not files:
        raise SystemExit(f"error: no PNG/TIFF images in {args.data}")
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    try:
        subset = work / "in"
        subset.mkdir()
        for f in files:
            shutil.copy(f, subset / f.name)
        # the network and window the checkpoint was trained with (its run's config.json), as medseg infer reads them
        trained = training_settings(BUNDLE, [args.checkpoint], {}).values if args.checkpoint else {}
        cfg = load_config(BUNDLE, "infer", trained=trained)
        net = cfg.get_parsed_content("network_def").to(device)
        ckpt = args.checkpoint
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = work / "model.pt"
            torch.save(net.state_dict(), ckpt)
        load_checkpoint(net, ckpt, device)  # as medseg infer loads it (a last checkpoint's averaged weights first)
        window = {k: cfg.get_parsed_content(k) for k in ("patch_size", "sw_batch_size", "overlap", "logit_shift")}

        def run_medseg(out: Path, tta: bool = False, close: bool = True) -> None:
            workflows.infer(str(BUNDLE), str(subset), str(out), str(ckpt), tta=tta, device=args.device,
                            progress=False, overrides={"close_contours": close})

        # warm-up on one image each, then the timed runs
        plain_monai(files[:1], work / "warm_plain", net, window, device)
        run_medseg(work / "warm_medseg")
        t_plain = timed(lambda: plain_monai(files, work / "plain", net, window, device))
        t_medseg = timed(lambda: run_medseg(work / "medseg"))
        t_open = timed(lambda: run_medseg(work / "medseg_open", close=False))
        rows = {"plain MONAI sliding_window_inference": t_plain, "medseg infer": t_medseg,
                "medseg infer, close_contours=false": t_open}
        if args.tta:
            rows["medseg infer --tta"] = timed(lambda: run_medseg(work / "medseg_tta", tta=True))

        agree = []
        for f in files:
            a = np.asarray(Image.open(work / "plain" / "mask" / f"{f.stem}.png")) > 0
            b = np.asarray(Image.open(work / "medseg_open" / "mask" / f"{f.stem}.png")) > 0
            agree.append(float((a == b).mean()))
        n = len(files)
        result = {
            "images": n,
            "image_size": list(np.asarray(Image.open(files[0])).shape),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "weights": str(args.checkpoint) if args.checkpoint else "untrained (seed 0)",
            "window": window,
            "seconds": {k: round(v, 2) for k, v in rows.items()},
            "images_per_second": {k: round(n / v, 3) for k, v in rows.items()},
            "ratio_vs_plain": {k: round(t_plain / v, 3) for k, v in rows.items()},
            "mask_pixel_agreement_medseg_vs_plain": round(float(np.mean(agree)), 5),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{n} images of {result['image_size']} on {device} ({result['torch_threads']} threads), "
          f"weights: {result['weights']}")
    print(f"| {'method':<40} | {'images/s':>9} | {'seconds':>8} | {'speed vs plain':>14} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 10}|{'-' * 16}|")
    for k in rows:
        print(f"| {k:<40} | {result['images_per_second'][k]:>9.3f} | {result['seconds'][k]:>8.2f} | "
              f"{result['ratio_vs_plain'][k]:>13.2f}x |")
    print(f"masks agree on {100 * result['mask_pixel_agreement_medseg_vs_plain']:.2f}% of pixels "
          "without close_contours (differences: medseg mirror-pads the borders and runs small images in one pass)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
