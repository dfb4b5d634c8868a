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

__all__ = ["count_cost", "cost_ratio", "layer_table"]


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


def layer_table(model: nn.Module, example_input: torch.Tensor) -> list[dict[str, object]]:
    """Per-layer breakdown of a model (paper appendix Tables 12–16) from one forward pass of ``example_input``
    (one sample): every leaf module (and every ``nn.MultiheadAttention`` as a whole) that has parameters or
    changes the shape, in execution order, with its input and output shapes (batch axis dropped), parameters
    and multiply–accumulates.

    Shapes are read by forward hooks and multiply–accumulates (half the FLOPs) by
    :class:`torch.utils.flop_counter.FlopCounterMode` per module, as :func:`count_cost` counts them: convolutions
    and matrix products; on the CPU the attention products inside ``scaled_dot_product_attention`` (queries ×
    keys, scores × values) are not among them.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or example_input.shape[0] != 1:
        raise ValueError("layer_table needs example_input with a batch of one, e.g. one image as [1, C, H, W]")
    units = {}
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, nn.MultiheadAttention):
            skip.add(name)
            units[name] = module
        elif name and not any(True for _ in module.children()):
            units[name] = module
    seen: dict[str, tuple[str, str]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            if name not in seen:
                first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                result = out[0] if isinstance(out, (tuple, list)) else out
                seen[name] = (_shape(first), _shape(result))
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in units.items()]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(to_model(example_input, model))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    root = type(model).__name__
    flops = {k.removeprefix(root + "."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    rows = []
    for name, (shape_in, shape_out) in seen.items():
        params = sum(p.numel() for p in units[name].parameters())
        if not params and shape_in == shape_out:
            continue  # activations, dropout, identities: no parameters, no change of shape
        rows.append({"layer": name, "type": type(units[name]).__name__, "input": shape_in, "output": shape_out,
                     "params": int(params), "MACs": int(flops.get(name, 0) // 2)})
    held = {id(p) for n in units for p in units[n].parameters()}
    other = [(n, p) for n, p in model.named_parameters() if id(p) not in held]
    if other:  # tokens, embeddings, layer scales: parameters that no leaf module holds
        rows.append({"layer": ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _ in other})), "type": "(parameters)",
                     "input": "—", "output": "—", "params": int(sum(p.numel() for _, p in other)), "MACs": 0})
    return rows


def _shape(t: object) -> str:
    """A tensor's shape without its batch axis, as ``C×H×W``."""
    if not isinstance(t, torch.Tensor):
        return "—"
    return "×".join(str(s) for s in t.shape[1:]) or "scalar"
