"""TACT, task-specific activation correction (related work: Sharma, Roy & Dziugaite, "The Non-Local Model
Merging Problem"): REPAIR (paper Eq. 2) with one target per task.

For task ``t`` every chosen pre-activation channel ``y`` of the merged network becomes ``s_t·y + o_t``, with
``(s_t, o_t)`` chosen so that its mean and std on task ``t``'s data equal expert ``t``'s there (each layer
measured with the earlier layers already corrected, as REPAIR does). ``shift=False`` keeps ``o_t = 0``: the
RESCALE-style variant. The corrections are stored per task, two numbers per channel, inside a
:class:`~vfnb.multitask.MultiTask` and folded into the weights at each ``forward(x, task)``: no copy of the
network per task. The experts must be in the merged network's basis (:func:`vfnb.align_many`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .multitask import MultiTask
from .normalize import Stats, corrections, layer_stats
from .validate import check_same_architecture

__all__ = ["tact"]


def tact(merged: MultiTask | nn.Module, experts: Sequence[nn.Module], task_data: Sequence[Any], *,
         shift: bool = True, layers: Sequence[str] | None = None, n_samples: int | None = None,
         names: Sequence[str] | None = None, targets: Sequence[Stats] | None = None,
         progress: bool = False) -> MultiTask:
    """The merged network with TACT's per-task corrections: a :class:`~vfnb.multitask.MultiTask` whose
    ``forward(x, t)`` matches expert ``t``'s pre-activation statistics on ``task_data[t]`` (training images).

    ``merged`` is a MultiTask (its heads are kept) or a plain merged network (then each expert's head is used);
    it is not modified, and the result holds its own copy of the body.
    ``layers`` defaults to REPAIR's (every layer but the head for a chain network); ``n_samples`` images of
    each task are used (``None``: all). ``targets`` (one :func:`vfnb.layer_stats` of each expert on its task's
    data) saves measuring the experts again when many merges are corrected toward the same experts.
    """
    experts, task_data = list(experts), list(task_data)
    if len(task_data) != len(experts):
        raise ValueError(f"{len(task_data)} datasets for {len(experts)} experts; pass one per task, in task order")
    if isinstance(merged, MultiTask):
        if merged.corrections is not None:
            raise ValueError("this MultiTask already carries corrections; apply TACT to the uncorrected merge "
                             "(e.g. model.with_body(model.body))")
        if merged.num_tasks != len(experts):
            raise ValueError(f"the merged model has {merged.num_tasks} task heads but {len(experts)} experts were given")
        base = merged
    else:
        base = MultiTask.from_experts(merged, experts, names)
    for e in experts:
        check_same_architecture(base.body, e)
    if layers is not None and base.head in layers:
        raise ValueError(f"layers include the head {base.head!r}: the heads are per task already, so TACT corrects "
                         "only the shared layers")
    if targets is not None and len(targets) != len(experts):
        raise ValueError(f"{len(targets)} sets of target statistics for {len(experts)} experts; pass one per task")
    found = []
    for t in tqdm(range(len(experts)), desc="TACT", disable=not progress, leave=False):
        goal = layer_stats(experts[t], task_data[t], layers, n_samples) if targets is None else targets[t]
        found.append(corrections(base.for_task(t), task_data[t], goal, shift=shift, layers=layers,
                                 n_samples=n_samples))
    return base.with_corrections(found, names)
