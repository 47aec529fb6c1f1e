"""How long the whole Table 5 takes for torchvision's AlexNet at 224×224, against peers run in
the same process: a full SVD for the FC layers and power iteration on the conv layers themselves
(autograd, 50 iterations: the usual way to estimate a conv's norm, a lower bound, not a bound).

    python benchmarks/lipschitz_benchmark.py [--threads N]

Writes ``benchmarks/results/lipschitz/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision

from advtrain.analysis import lipschitz_bounds
from advtrain.recipes.run_folder import write_json


def power_iteration(layer: torch.nn.Module, input_shape: tuple[int, ...], steps: int) -> float:
    """A conv's norm by power iteration on its linear part (bias removed), via autograd."""
    conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, bias=False)
    conv.weight.data.copy_(layer.weight.data)
    x = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        x = (x / x.norm()).requires_grad_(True)
        y = conv(x)
        (x,) = torch.autograd.grad(y, x, y)
    with torch.no_grad():
        return float(conv(x / x.norm()).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lipschitz"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    started = time.perf_counter()
    table = lipschitz_bounds(model, (3, 224, 224))
    ours_seconds = time.perf_counter() - started

    peers = []
    started_all = time.perf_counter()
    for row in table.rows:
        if row.weight_shape is None:
            continue
        layer = model.get_submodule(row.name)
        started = time.perf_counter()
        if isinstance(layer, torch.nn.Linear):
            value, method = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2)), "full SVD"
        elif isinstance(layer, torch.nn.Conv2d):
            value, method = power_iteration(layer, row.input_size, steps=50), "power iteration ×50"
        else:
            continue
        peers.append({"layer": row.name, "ours": row.bound, "peer": value, "peer_method": method,
                      "peer_seconds": time.perf_counter() - started})
    peer_seconds = time.perf_counter() - started_all
    result = {"model": "alexnet (random weights, seed 0)", "input": [3, 224, 224], "threads": torch.get_num_threads(),
              "ours_seconds": ours_seconds, "peer_seconds": peer_seconds, "ratio": ours_seconds / peer_seconds,
              "product": table.product, "layers": peers}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)  # strict JSON (NaN as null), written atomically
    print(f"AlexNet 224×224, {torch.get_num_threads()} threads: whole table {ours_seconds:.1f} s; "
          f"peers on the conv and FC layers {peer_seconds:.1f} s; ratio {ours_seconds / peer_seconds:.2f}")
    print("| layer | our bound | peer | peer's method | peer seconds |\n|---|---|---|---|---|")
    for p in peers:
        print(f"| {p['layer']} | {p['ours']:.4g} | {p['peer']:.4g} | {p['peer_method']} | {p['peer_seconds']:.1f} |")


if __name__ == "__main__":
    main()
