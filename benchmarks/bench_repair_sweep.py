"""Cost of an 11-point α sweep with REPAIR (issue 4), as a multiple of one forward pass.

The reference statistics of the two edge models are measured once (`normalize.layer_stats`, one pass
each); every α then interpolates, takes its targets from `normalize.weighted_stats` (no pass) and runs
`normalize.repair` over the calibration data. The goal is at most two passes over the calibration
data per α point. Passes are counted by a hook on the model's own forward (images seen / calibration
size), independently of the timing.

Prints the passes per α (goal <= 2), the total time in forward passes (goal: 2 + 11 × 2 = 24) and
each ratio to its goal (below 1.0 meets it). Run: `.venv/bin/python benchmarks/bench_repair_sweep.py`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from vfnb.data import calibration_subset, load_dataset
from vfnb.merge import interpolate
from vfnb.models import build_model
from vfnb.normalize import layer_stats, repair, weighted_stats

N_CALIB, ALPHAS = 1000, np.linspace(0, 1, 11)


class PassCounter:
    """Counts the images that go through a model's top-level forward."""

    def __init__(self) -> None:
        self.images = 0

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(lambda mod, args: setattr(self, "images", self.images + len(args[0])))


def edge(seed: int) -> torch.nn.Module:
    """A random VGG16 (×0.25, no norm layers) with small positive biases, so that its ReLUs are live."""
    torch.manual_seed(seed)
    m = build_model("vgg16", norm="none", width=0.25, in_channels=1, input_size=28).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(0.0, 0.1)
    return m


def main() -> None:
    torch.set_grad_enabled(False)
    calib = calibration_subset(load_dataset("mnist5k", "train"), N_CALIB)
    x = calib.tensors()[0]
    a, b = edge(0), edge(1)
    a(x[:500])  # warm-up
    t = time.perf_counter()
    for _ in range(3):
        a(x)
    forward = (time.perf_counter() - t) / 3

    t = time.perf_counter()
    stats = [layer_stats(a, calib), layer_stats(b, calib)]
    t_ref = time.perf_counter() - t
    passes = []
    t = time.perf_counter()
    for alpha in ALPHAS:
        merged = interpolate(a, b, float(alpha))
        counter = PassCounter()
        counter.attach(merged)
        repair(merged, data=calib, targets=weighted_stats(stats, [1 - alpha, alpha]), inplace=True)
        passes.append(counter.images / N_CALIB)
    t_sweep = time.perf_counter() - t
    total = (t_ref + t_sweep) / forward
    goal = 2 + 2 * len(ALPHAS)
    print(f"one forward pass over {N_CALIB} calibration images: {forward * 1e3:.1f} ms")
    print(f"reference statistics (2 edge models, once): {t_ref / forward:.1f} forward passes")
    print(f"passes over the calibration data per α: max {max(passes):.2f} (goal <= 2, ratio {max(passes) / 2:.2f})")
    print(f"11-point sweep with REPAIR: {total:.1f} forward passes in all (goal <= {goal}, ratio {total / goal:.2f}); "
          f"per α {t_sweep / forward / len(ALPHAS):.2f}")


if __name__ == "__main__":
    main()
