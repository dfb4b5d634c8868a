"""Multi-task models from task vectors (related work: Sharma, Roy & Dziugaite, "The Non-Local Model Merging
Problem"; Ilharco et al. 2023, Task Arithmetic; Yadav et al. 2023, TIES-Merging).

Experts ``θ_t`` of one architecture are fine-tuned for tasks ``t`` from a base ``θ_base`` (a foundation model,
or for non-local experts the average of their foundations aligned modulo permutation). The *task vector* is
``τ_t = θ_t − θ_base``, over every parameter but the classifier head (the last layer,
``structure.layers[-1]``); buffers come from the base. Heads stay per task: a merged model is a
:class:`MultiTask`, one shared network with one head per task, ``forward(x, task)``.

* **Task Arithmetic**: ``θ = θ_base + Σ_t λ_t τ_t``.
* **TIES**: (1) trim each ``τ_t`` to its ``density`` fraction of largest magnitudes (over the whole vector);
  (2) elect a sign per entry, the sign of the summed trimmed vectors (the side with more total mass);
  (3) disjoint mean: average each entry over the tasks whose trimmed entry is nonzero and agrees with the
  elected sign (0 where none does); ``θ = θ_base + λ·τ_TIES``.
* **TALL masks** (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"):
  from the merged task vector ``τ_MTL`` (Task Arithmetic's ``λ Σ_t τ_t``), task ``t`` keeps the entries where
  ``|τ_t| ≥ λ_t·|τ_MTL − τ_t|``, i.e. where its own task vector dominates the others' contribution; its network
  is ``θ_base + m_t ∘ τ_MTL`` (one shared vector and one bit per weight and task).
* **Linear probing** refits each task's head on the merged network's features (the head's input).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from .activations import labelled_batches, layer_outputs
from .normalize import folded_parameters
from .structure import Structure, structure_of
from .validate import check_finite, check_same_architecture

__all__ = ["MultiTask", "head_layer", "task_vectors", "task_arithmetic", "ties_merging", "ties_vector",
           "tall_masks", "tall_merging", "linear_probe", "features"]

TaskVector = dict[str, torch.Tensor]


def head_layer(model: nn.Module) -> str:
    """The name of the classifier head: the last of the paper's layers (``structure.layers[-1]``)."""
    return structure_of(model).layers[-1]


class _Affines(nn.Module):
    """One task's per-channel corrections ``{layer: (scale, offset)}``, held as buffers (saved with the model)."""

    def __init__(self, corrections: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.layers = list(corrections)
        for i, (scale, offset) in enumerate(corrections.values()):
            self.register_buffer(f"scale{i}", scale.detach().clone())
            self.register_buffer(f"offset{i}", offset.detach().clone())

    def as_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (getattr(self, f"scale{i}"), getattr(self, f"offset{i}")) for i, n in enumerate(self.layers)}

    def get_extra_state(self) -> list[str]:  # the layer names travel with the state dict
        return list(self.layers)

    def set_extra_state(self, state: list[str]) -> None:
        if list(state) != self.layers:
            raise ValueError(f"these corrections are for layers {list(state)}, but this model corrects {self.layers}; "
                             "build the MultiTask with the same layers before loading its state")


class _Masks(nn.Module):
    """One task's TALL masks ``{parameter: bool tensor}``, held as buffers with the names in the extra state."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(masks)
        for i, m in enumerate(masks.values()):
            self.register_buffer(f"mask{i}", m.detach().to(torch.bool).clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"mask{i}") for i, n in enumerate(self.names)}

    def get_extra_state(self) -> list[str]:
        return list(self.names)

    def set_extra_state(self, state: list[str]) -> None:
        if list(state) != self.names:
            raise ValueError(f"these masks cover {list(state)[:3]}..., this model's cover {self.names[:3]}...")


class MultiTask(nn.Module):
    """One shared network (``body``, whose own head is not used) with a head per task, and optionally per-task
    pre-activation corrections of the shared layers (TACT, :func:`vfnb.tact`). ``forward(x, task)`` runs the body
    with task ``task``'s head and corrections folded in (``torch.func.functional_call``; the body is never
    modified, and runs in its own train/eval mode); :meth:`for_task` returns that network as an ordinary model in
    eval mode for every other vfnb function. The MultiTask holds ``body`` itself, not a copy (the merges and
    :func:`vfnb.tact` pass it a fresh one); the heads are copied. With TALL masks (:func:`tall_merging`), ``base``
    holds θ_base and task ``t`` uses ``θ_base + m_t ∘ (θ_body − θ_base)`` on the masked parameters, before its
    corrections are folded.
    """

    def __init__(self, body: nn.Module, heads: Sequence[nn.Module], names: Sequence[str] | None = None,
                 corrections: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 masks: Sequence[Mapping[str, torch.Tensor]] | None = None, base: nn.Module | None = None) -> None:
        super().__init__()
        check_finite(body, "the merged body")
        self.head = head_layer(body)
        template = dict(body.named_modules())[self.head]
        heads = list(heads)
        if not heads:
            raise ValueError("a MultiTask model needs at least one head")
        want = {k: (p.shape, p.dtype) for k, p in template.named_parameters()}
        for i, h in enumerate(heads):
            if type(h) is not type(template) or {k: (p.shape, p.dtype) for k, p in h.named_parameters()} != want:
                raise ValueError(f"head {i} ({h}) does not fit the body's last layer {self.head!r} ({template}): a head "
                                 "needs the same type, parameter names, shapes and dtype")
        self.body = body
        self.heads = nn.ModuleList(copy.deepcopy(h) for h in heads)
        self.names = list(names) if names is not None else [f"task {i}" for i in range(len(heads))]
        if len(self.names) != len(heads):
            raise ValueError(f"{len(self.names)} task names for {len(heads)} heads")
        if corrections is not None:
            if len(corrections) != len(heads):
                raise ValueError(f"{len(corrections)} sets of corrections for {len(heads)} tasks")
            if any(self.head in c for c in corrections):
                raise ValueError(f"corrections of the head {self.head!r}: the heads are per task, so only the shared "
                                 "layers are corrected (leave the head out of TACT's layers)")
        self.corrections = None if corrections is None else nn.ModuleList(_Affines(c) for c in corrections)
        if (masks is None) != (base is None):
            raise ValueError("TALL masks need the base they are relative to (pass both masks and base, or neither)")
        self.masks = self.base = None
        if masks is not None:
            check_same_architecture(body, base)
            if len(masks) != len(heads):
                raise ValueError(f"{len(masks)} sets of masks for {len(heads)} tasks")
            shapes = {k: p.shape for k, p in body.named_parameters()}
            for m in masks:
                bad = [k for k, v in m.items() if k not in shapes or v.shape != shapes[k]]
                if bad:
                    raise ValueError(f"masks for {bad[:3]} do not match the body's parameters")
            self.masks = nn.ModuleList(_Masks(m) for m in masks)
            self.base = copy.deepcopy(base)
        self._structure: Structure | None = None

    @classmethod
    def from_experts(cls, body: nn.Module, experts: Sequence[nn.Module], names: Sequence[str] | None = None,
                     corrections: Any = None) -> "MultiTask":
        """``body`` with each expert's own head."""
        head = head_layer(body)
        for e in experts:
            check_same_architecture(body, e)
        return cls(body, [dict(e.named_modules())[head] for e in experts], names, corrections)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def with_body(self, body: nn.Module) -> "MultiTask":
        """The same heads (and no corrections) on another body of the same architecture (e.g. after REPAIR)."""
        check_same_architecture(self.body, body)
        if self.masks is not None:
            raise ValueError("a TALL-masked model has one network per task; correct each for_task(t) instead")
        return MultiTask(body, list(self.heads), self.names)

    def with_corrections(self, corrections: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                         names: Sequence[str] | None = None) -> "MultiTask":
        """A copy (own body) with per-task ``corrections`` (TACT), keeping heads and masks."""
        masks = None if self.masks is None else [m.as_dict() for m in self.masks]
        return MultiTask(copy.deepcopy(self.body), list(self.heads), names or self.names, corrections, masks,
                         self.base)

    def task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.names:
                raise ValueError(f"unknown task {task!r}; this model's tasks are {self.names}")
            return self.names.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be a name or an index in [0, {self.num_tasks}), got {task!r}")
        return task

    def parameters_for(self, task: int | str) -> dict[str, torch.Tensor]:
        """The parameters that differ from the body's for ``task``: its head, and its folded corrections."""
        t = self.task_index(task)
        params = {f"{self.head}.{k}": v for k, v in self.heads[t].named_parameters()}
        if self.masks is not None:
            body, base = dict(self.body.named_parameters()), dict(self.base.named_parameters())
            for k, m in self.masks[t].as_dict().items():
                params[k] = base[k] + m.to(body[k].dtype) * (body[k] - base[k])
        if self.corrections is not None:
            if self._structure is None:
                self._structure = structure_of(self.body)
            params.update(folded_parameters(self.body, self.corrections[t].as_dict(), self._structure, params))
        return params

    def forward(self, x: torch.Tensor, task: int | str) -> torch.Tensor:
        return functional_call(self.body, self.parameters_for(task), (x,))

    @torch.no_grad()
    def for_task(self, task: int | str) -> nn.Module:
        """A standalone copy of the network for ``task`` (its head, its corrections folded in)."""
        model = copy.deepcopy(self.body)
        params = dict(model.named_parameters())
        for k, v in self.parameters_for(task).items():
            params[k].copy_(v)
        return model.eval()


def _check(base: nn.Module, experts: Sequence[nn.Module]) -> list[nn.Module]:
    experts = list(experts)
    if not experts:
        raise ValueError("need at least one expert")
    check_finite(base, "base")
    for i, e in enumerate(experts):
        if not isinstance(e, nn.Module):
            raise TypeError(f"experts[{i}] is a {type(e).__name__}, not an nn.Module")
        check_same_architecture(base, e)
        check_finite(e, f"experts[{i}]")
    return experts


def task_vectors(base: nn.Module, experts: Sequence[nn.Module]) -> list[TaskVector]:
    """``τ_t = θ_t − θ_base`` per expert, over every parameter but the head's (``{name: tensor}``). For
    non-local experts, pass the experts and the base aligned into one basis (:func:`vfnb.align_many`)."""
    experts = _check(base, experts)
    head = head_layer(base) + "."
    b = {k: v.detach() for k, v in base.named_parameters() if not k.startswith(head)}
    out = []
    for e in experts:
        p = dict(e.named_parameters())
        out.append({k: p[k].detach().to(v) - v for k, v in b.items()})
    return out


def _apply(base: nn.Module, vector: TaskVector, experts: Sequence[nn.Module], names: Sequence[str] | None) -> MultiTask:
    body = copy.deepcopy(base)
    with torch.no_grad():
        params = dict(body.named_parameters())
        for k, v in vector.items():
            params[k].add_(v.to(params[k]))
    return MultiTask.from_experts(body.eval(), experts, names)


def _scales(scale: float | Sequence[float], n: int) -> list[float]:
    s = [scale] * n if isinstance(scale, (int, float)) and not isinstance(scale, bool) else list(scale)
    if len(s) != n or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in s):
        raise ValueError(f"scale must be a finite number or one per expert ({n}), got {scale!r}")
    return [float(v) for v in s]


def task_arithmetic(base: nn.Module, experts: Sequence[nn.Module], scale: float | Sequence[float] = 1.0, *,
                    names: Sequence[str] | None = None) -> MultiTask:
    """Task Arithmetic: ``θ = θ_base + Σ_t λ_t τ_t`` (``scale``: one λ, or one per expert) with each expert's
    head. ``scale = 1/N`` is the plain average of the experts."""
    experts = _check(base, experts)
    lam = _scales(scale, len(experts))
    taus = task_vectors(base, experts)
    vector = {k: sum(l * t[k] for l, t in zip(lam, taus)) for k in taus[0]}
    return _apply(base, vector, experts, names)


def ties_vector(vectors: Sequence[TaskVector], density: float) -> TaskVector:
    """TIES-Merging's merged task vector (trim, elect sign, disjoint mean; module docstring) of ``vectors``."""
    vectors = list(vectors)
    if not vectors:
        raise ValueError("ties_vector needs at least one task vector")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of each task vector kept), got {density!r}")
    keys = list(vectors[0])
    for i, tau in enumerate(vectors):
        if list(tau) != keys or any(tau[k].shape != vectors[0][k].shape for k in keys):
            raise ValueError(f"task vector {i} covers other parameters (or shapes) than task vector 0; take them all "
                             "with task_vectors(base, experts) from one architecture")
    trimmed = []
    for tau in vectors:
        flat = torch.cat([tau[k].reshape(-1).double() for k in keys])
        k = max(1, int(round(density * flat.numel())))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().topk(k).indices] = True
        trimmed.append(torch.where(keep, flat, torch.zeros_like(flat)))
    stack = torch.stack(trimmed)                      # [tasks, entries]
    sign = torch.sign(stack.sum(0))                   # elected sign: the side with more total mass
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0)
    merged = torch.where(count > 0, (stack * agree).sum(0) / count.clamp_min(1), torch.zeros_like(sign))
    out, i = {}, 0
    for k in keys:
        n = vectors[0][k].numel()
        out[k] = merged[i:i + n].view_as(vectors[0][k]).to(vectors[0][k].dtype)
        i += n
    return out


def ties_merging(base: nn.Module, experts: Sequence[nn.Module], density: float = 0.2, scale: float = 1.0, *,
                 names: Sequence[str] | None = None) -> MultiTask:
    """TIES-Merging (Yadav et al. 2023): ``θ = θ_base + λ·ties_vector(τ_1..τ_N, density)`` with each expert's
    head."""
    experts = _check(base, experts)
    (lam,) = _scales(scale, 1)
    vector = {k: lam * v for k, v in ties_vector(task_vectors(base, experts), density).items()}
    return _apply(base, vector, experts, names)


def tall_masks(base: nn.Module, experts: Sequence[nn.Module], merged: MultiTask | nn.Module,
               lam: float | Sequence[float] = 0.4) -> list[dict[str, torch.Tensor]]:
    """TALL masks (Wang et al. 2024): per expert ``t``, ``m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t|`` entrywise, with
    ``τ_MTL`` the merged network's task vector (``merged`` minus ``base``, heads excluded); ``lam`` is one λ or
    one per expert."""
    experts = _check(base, experts)
    lams = _scales(lam, len(experts))
    if any(v < 0 for v in lams):
        raise ValueError(f"TALL's λ must be >= 0, got {lam!r}")
    body = merged.body if isinstance(merged, MultiTask) else merged
    (mtl,) = task_vectors(base, [body])
    return [{k: tau[k].abs() >= l * (mtl[k] - tau[k]).abs() for k in tau}
            for l, tau in zip(lams, task_vectors(base, experts))]


def tall_merging(base: nn.Module, experts: Sequence[nn.Module], scale: float = 1.0,
                 lam: float | Sequence[float] = 0.4, *, names: Sequence[str] | None = None) -> MultiTask:
    """Task Arithmetic at ``scale`` with TALL masks: task ``t`` runs ``θ_base + m_t ∘ τ_MTL`` (:func:`tall_masks`)
    with its own head; the MultiTask stores τ_MTL once (as its body) and one boolean mask per task."""
    merged = task_arithmetic(base, experts, scale, names=names)
    masks = tall_masks(base, experts, merged, lam)
    return MultiTask(merged.body, list(merged.heads), merged.names, masks=masks, base=base)


def features(model: nn.Module, data: Any, n_samples: int | None = None, batch_size: int = 1000
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of ``model``'s head (the last-layer embedding; non-local paper Fig. 4) on ``data``, flattened per
    sample, with the labels (:func:`vfnb.activations.layer_outputs` per batch)."""
    name = f"{head_layer(model)}:input"
    got, ys = [], []
    for x, y in labelled_batches(data, batch_size, model, n_samples):
        got.append(layer_outputs(model, x, [name])[name].flatten(1).cpu())
        ys.append(y.cpu())
    return torch.cat(got), torch.cat(ys)


def linear_probe(model: MultiTask, task_data: Sequence[Any], *, n_samples: int | None = None,
                 weight_decay: float = 1e-4, max_iter: int = 100, progress: bool = False) -> MultiTask:
    """Refit every task's head on the shared network's features (:func:`features` of ``model.for_task(t)`` on
    ``task_data[t]``, training images): multinomial logistic regression by full-batch L-BFGS from the current
    head, with an L2 penalty ``weight_decay``; deterministic. The body and any corrections are kept."""
    if not isinstance(model, MultiTask):
        raise TypeError(f"linear_probe needs a MultiTask model (from task_arithmetic, ties_merging or tact), got "
                        f"{type(model).__name__}")
    task_data = list(task_data)
    if len(task_data) != model.num_tasks:
        raise ValueError(f"{len(task_data)} datasets for {model.num_tasks} tasks; pass one per task, in task order")
    out = copy.deepcopy(model)
    for t in tqdm(range(model.num_tasks), desc="linear probes", disable=not progress, leave=False):
        x, y = features(model.for_task(t), task_data[t], n_samples)
        head = out.heads[t]
        if not isinstance(head, nn.Linear):
            raise ValueError(f"linear probing needs a linear head, got {type(head).__name__}")
        w = head.weight.detach().clone().double().requires_grad_(True)
        b = (head.bias.detach().clone().double() if head.bias is not None
             else torch.zeros(w.shape[0], dtype=torch.float64)).requires_grad_(head.bias is not None)
        xd = x.double()
        opt = torch.optim.LBFGS([w, b] if head.bias is not None else [w], max_iter=max_iter,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xd @ w.T + b, y) + weight_decay * (w ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            head.weight.copy_(w.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(b.to(head.bias))
    return out
