"""Time training steps of a bundle's network: plain float32 PyTorch against medseg's CPU bfloat16 autocast, one run.

Both sides run the same network (the bundle's `network_def`), optimizer (Adam) and loss (cross-entropy)
on the same random batch of the bundle's patch size; the bfloat16 side wraps the forward pass in
`medseg.inferers.CpuBf16Inferer`, as the bundles' trainers do (`cpu_bf16`); a third side adds
`torch.compile` of the network, as the trainers do with `compile: true` (its warm-up steps include the
compilation, about a minute on 2 CPU cores, in its first run; `--no-compile` skips it). Every run of a side
starts from the same weights; the sides run in turn, `--repeats` times, and the script prints each side's
median steps/s after the warm-up steps, its range, the ratio, and the loss of the first and last step. The
first step's losses must agree within 2 % (the same weights on the same batch), else it exits with an error.

    python benchmarks/train_speed.py --bundle bundles/isbi_em --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name, positive_int
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from medseg.bundle import bundle_configs
from medseg.inferers import CpuBf16Inferer, cpu_bf16_supported

# how far (relative) the first step's loss under bfloat16 may be from float32's
LOSS_TOLERANCE = 0.02


def timed_steps(net: torch.nn.Module, inferer, x: torch.Tensor, y: torch.Tensor, steps: int,
                warmup: int) -> tuple[float, float, float]:
    """Steps per second after ``warmup`` steps from ``net``'s weights, with the loss of the first step and of
    the last."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    losses = []
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(inferer(x, net), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    speed = steps / (time.perf_counter() - start)
    return speed, float(losses[0]), float(losses[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[1] / "bundles" / "isbi_em")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per side and run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs of each side, in turn")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile side")
    args = parser.parse_args()
    if args.warmup < 0:
        parser.error(f"argument --warmup: {args.warmup} is below 0")

    cfg = ConfigParser()
    cfg.read_config(bundle_configs(args.bundle, "train"))
    patch = [int(v) for v in cfg["patch_size"]]
    torch.manual_seed(0)
    net = cfg.get_parsed_content("network_def")
    classes = int(cfg.get_parsed_content("network_def#out_channels"))
    x = torch.rand(args.batch, int(cfg.get_parsed_content("network_def#in_channels")), *patch)
    y = torch.randint(0, classes, (args.batch, *patch))
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    sides = {"plain PyTorch float32": (SimpleInferer(), net), "medseg CpuBf16Inferer": (CpuBf16Inferer(), net)}
    if not args.no_compile:
        sides["CpuBf16Inferer + compile"] = (CpuBf16Inferer(), torch.compile(net))  # compiled on its first step
    speeds = {name: [] for name in sides}
    losses = {}
    for _ in range(args.repeats):  # interleaved, so that other load on the machine falls on every side
        for name, (inferer, model) in sides.items():
            net.load_state_dict(initial)  # every run starts from the same weights
            speed, first, last = timed_steps(model, inferer, x, y, args.steps, args.warmup)
            speeds[name].append(speed)
            losses[name] = (first, last)
    rows = {name: statistics.median(v) for name, v in speeds.items()}
    plain = rows["plain PyTorch float32"]
    result = {
        "bundle": args.bundle.name, "batch": args.batch, "patch": patch, "threads": torch.get_num_threads(),
        "machine": cpu_name(), "torch": torch.__version__, "repeats": args.repeats, "steps": args.steps,
        "warmup": args.warmup, "cpu_bf16_native": cpu_bf16_supported(),
        "steps_per_second": {k: round(v, 3) for k, v in rows.items()},
        "steps_per_second_all": {k: [round(s, 3) for s in v] for k, v in speeds.items()},
        "ratio_vs_plain": {k: round(v / plain, 2) for k, v in rows.items()},
        "loss_first_last": {k: [round(a, 4), round(b, 4)] for k, (a, b) in losses.items()},
    }
    print(f"{args.bundle.name}: batch {args.batch} x {patch}, {result['threads']} threads, torch "
          f"{torch.__version__}, {result['machine']}, native bfloat16: {result['cpu_bf16_native']}, median of "
          f"{args.repeats} interleaved runs of {args.steps} steps")
    print(f"| {'method':<25} | {'steps/s':>8} | {'range':>13} | {'speed vs plain':>14} | {'loss, first → last':>19} |")
    print(f"|{'-' * 27}|{'-' * 10}|{'-' * 15}|{'-' * 16}|{'-' * 21}|")
    for k, v in rows.items():
        first, last = losses[k]
        print(f"| {k:<25} | {v:>8.3f} | {min(speeds[k]):>5.2f}–{max(speeds[k]):<7.2f} | {v / plain:>13.2f}x | "
              f"{first:>8.4f} → {last:<8.4f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    # each side's first step is a forward pass of the same weights on the same batch: its loss may differ by
    # bfloat16's rounding, not more
    reference = losses["plain PyTorch float32"][0]
    off = [k for k, (first, _) in losses.items() if abs(first - reference) > LOSS_TOLERANCE * abs(reference)]
    if off:
        raise SystemExit(f"error: the first step's loss of {', '.join(off)} is more than "
                         f"{100 * LOSS_TOLERANCE:.0f}% from plain float32's ({reference:.4f}): the sides do not "
                         "compute alike, so their timings are not comparable")


if __name__ == "__main__":
    main()
