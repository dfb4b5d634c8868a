"""Alignment speed against the goals of issue 3, on a 2-core machine.

1. Weight matching between two full-width VGG16 models (random init, seeds 0 and 1, example input
   zeros(1, 3, 32, 32)), one descent (``orders=1``, Git Re-Basin's algorithm): goal at most 2 s (the
   paper's published implementation took 18-40 s here; ``bench_wm_reference.py`` times a plain
   implementation in the same run). The default call (``orders=2``) is also printed.
2. Activation matching's statistics against one forward pass of both models over the same data
   (1,000 mnist5k training images, VGG16 at width 0.25, one input channel): goal at most 1.5x.

Prints each figure and its ratio to the goal (below 1.0 meets it). The first call of each is a
warm-up (fx tracing, imports) and is not timed. Run: `.venv/bin/python benchmarks/bench_matching.py`.
"""
from __future__ import annotations

import time

import torch

from vfnb import activation_matching, build_model, calibration_subset, load_dataset, weight_matching

WM_GOAL_S = 2.0
AM_GOAL_RATIO = 1.5


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_weight_matching() -> None:
    torch.manual_seed(0)
    a = build_model("vgg16")
    torch.manual_seed(1)
    b = build_model("vgg16")
    x = torch.zeros(1, 3, 32, 32)
    weight_matching(a, b, x, seed=0, orders=1)  # warm-up
    dt = _best(lambda: weight_matching(a, b, x, seed=0, orders=1), repeat=2)
    print(f"weight matching, full-width VGG16, one descent (orders=1): {dt:6.2f} s  goal {WM_GOAL_S:.1f} s  "
          f"ratio {dt / WM_GOAL_S:.2f}")
    dt2 = _best(lambda: weight_matching(a, b, x, seed=0), repeat=1)
    print(f"weight matching, full-width VGG16, default (orders=2: Git Re-Basin's descent and the warm start): "
          f"{dt2:6.2f} s ({dt2 / dt:.1f}x one descent)")


@torch.no_grad()
def bench_activation_matching(n: int = 1000, batch_size: int = 500) -> None:
    data = calibration_subset(load_dataset("mnist5k", "train"), n)
    kw = dict(in_channels=1, num_classes=10, input_size=28, width=0.25)
    torch.manual_seed(0)
    a = build_model("vgg16", **kw).eval()
    torch.manual_seed(1)
    b = build_model("vgg16", **kw).eval()
    batches = [x for x, _ in data.batches(batch_size, augment=False)]

    def forward() -> None:
        for x in batches:
            a(x)
            b(x)

    activation_matching(a, b, data, batch_size=batch_size)  # warm-up
    fwd = _best(forward)
    am = _best(lambda: activation_matching(a, b, data, batch_size=batch_size))
    ratio = am / fwd
    print(f"activation matching, {n} images, VGG16 x0.25: {am:6.2f} s; forward of both models {fwd:6.2f} s; "
          f"ratio {ratio:.2f}  goal {AM_GOAL_RATIO:.1f}x  ratio to goal {ratio / AM_GOAL_RATIO:.2f}")


def main() -> None:
    torch.manual_seed(0)
    bench_weight_matching()
    bench_activation_matching()


if __name__ == "__main__":
    main()
