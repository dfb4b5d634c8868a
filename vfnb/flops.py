"""Parameter and FLOP counts of a model (paper Table 1, columns "Params" and "FLOPs").

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one real forward pass: a
multiply–add counts as two FLOPs, and only the operations PyTorch's counter knows (convolutions,
matrix products) are counted; element-wise operations (ReLU, additions, normalization) are not,
which is the usual convention and the paper's. Parameters are the elements of ``model.parameters()``
(buffers such as BatchNorm running statistics are not parameters). A module held twice — the two
stems of a :class:`~vfnb.pfm.PreserveFirst` model — is counted twice, because it is two modules.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .activations import to_model

__all__ = ["count_cost", "cost_ratio"]


@torch.no_grad()
def count_cost(model: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    """``{"params": P, "flops": F}``: the number of parameters, and the FLOPs of one forward pass
    **per input sample** (the count on ``example_input`` divided by its batch size).

    The model runs once in eval mode without gradients; its mode is restored. Shared parameters
    (the same tensor reachable twice) are counted once, as ``model.parameters()`` yields them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("example_input must be a tensor with a batch axis first (e.g. one image as [1, C, H, W])")
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(to_model(example_input, model))
    finally:
        model.train(was_training)
    return {"params": float(params), "flops": counter.get_total_flops() / example_input.shape[0]}


def cost_ratio(model: nn.Module, reference: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    """``count_cost(model)`` divided by ``count_cost(reference)`` (paper Table 1: "(1.2×)")."""
    c, r = count_cost(model, example_input), count_cost(reference, example_input)
    if r["params"] == 0 or r["flops"] == 0:
        raise ValueError("the reference model has no parameters or no counted FLOPs; ratios are undefined")
    return {"params": c["params"] / r["params"], "flops": c["flops"] / r["flops"]}
