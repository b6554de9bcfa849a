"""Time training steps of a bundle's network: plain float32 PyTorch against medseg's CPU bfloat16 autocast, one run.

Both sides run the same network (the bundle's `network_def`), optimizer (Adam) and loss (cross-entropy)
on the same random batch of the bundle's patch size; the bfloat16 side wraps the forward pass in
`medseg.inferers.CpuBf16Inferer`, as the bundles' trainers do (`cpu_bf16`); a third side adds
`torch.compile` of the network, as the trainers do with `compile: true` (its warm-up steps include the
compilation, about a minute on 2 CPU cores; `--no-compile` skips it). The script prints steps/s per side
and the ratio, after warm-up steps.

    python benchmarks/train_speed.py --bundle bundles/isbi_em --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from medseg.bundle import bundle_configs
from medseg.inferers import CpuBf16Inferer, cpu_bf16_supported


def steps_per_second(net: torch.nn.Module, inferer, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(inferer(x, net), y)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[1] / "bundles" / "isbi_em")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile side")
    args = parser.parse_args()

    cfg = ConfigParser()
    cfg.read_config(bundle_configs(args.bundle, "train"))
    patch = [int(v) for v in cfg["patch_size"]]
    torch.manual_seed(0)
    net = cfg.get_parsed_content("network_def")
    classes = int(cfg.get_parsed_content("network_def#out_channels"))
    x = torch.rand(args.batch, int(cfg.get_parsed_content("network_def#in_channels")), *patch)
    y = torch.randint(0, classes, (args.batch, *patch))
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    rows = {}
    sides = [("plain PyTorch float32", SimpleInferer(), False), ("medseg CpuBf16Inferer", CpuBf16Inferer(), False)]
    if not args.no_compile:
        sides.append(("CpuBf16Inferer + compile", CpuBf16Inferer(), True))
    for name, inferer, compiled in sides:
        net.load_state_dict(initial)
        rows[name] = steps_per_second(torch.compile(net) if compiled else net, inferer, x, y, args.steps, args.warmup)
    plain = rows["plain PyTorch float32"]
    result = {
        "bundle": args.bundle.name, "batch": args.batch, "patch": patch, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_bf16_native": cpu_bf16_supported(),
        "steps_per_second": {k: round(v, 3) for k, v in rows.items()},
        "ratio_vs_plain": {k: round(v / plain, 2) for k, v in rows.items()},
    }
    print(f"{args.bundle.name}: batch {args.batch} x {patch}, {result['threads']} threads, "
          f"native bfloat16: {result['cpu_bf16_native']}")
    print(f"| {'method':<25} | {'steps/s':>8} | {'speed vs plain':>14} |")
    print(f"|{'-' * 27}|{'-' * 10}|{'-' * 16}|")
    for k, v in rows.items():
        print(f"| {k:<25} | {v:>8.3f} | {v / plain:>13.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
