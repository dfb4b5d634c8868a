"""Activation capture (ARCHITECTURE.md "Activations"): data → batches, lock-step capture of two models,
and streaming moments.

*Data* arguments across vfnb accept a :class:`~vfnb.data.VisionData` (its normalized images, read
without augmentation), a tensor of inputs, or an iterable of ``x`` or ``(x, y)`` batches. Inputs are
moved to the model's device **and dtype**, so float64 models work end to end.

Two models of one architecture are run node by node on the same inputs (:func:`lockstep`), so a hook
sees both models' activation at a point as soon as it is computed. :func:`collect_paired` feeds those
pairs, as float64 ``[units, samples]`` matrices, to streaming statistics: :class:`CrossMoments`
(Pearson correlations, activation matching) or :class:`JointMoments` (the full joint covariance, CCA
and ZipIt!). :func:`batch_moments` and :func:`merge_moments` give exact per-channel mean/variance over
batches (REPAIR, RESCALE).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .data import VisionData, calibration_subset

__all__ = ["dtype_of", "to_model", "batches", "labelled_batches", "peek", "inputs", "chunks", "example_input", "lockstep",
           "PairStats", "CrossMoments", "JointMoments", "collect_paired", "batch_moments", "merge_moments", "layer_outputs"]


def dtype_of(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer (float32 if it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_model(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on the device of ``model``, in its floating dtype (integer inputs keep their dtype)."""
    return x.to(device=_device_of(model), dtype=dtype_of(model) if x.is_floating_point() else x.dtype)


def _check_n(n_samples: int | None) -> int | None:
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be an integer >= 1 or None (all of the data), got {n_samples!r}")
    return n_samples


def labelled_batches(data: Any, batch_size: int = 500, model: nn.Module | None = None, n_samples: int | None = None,
                     seed: int = 0, need_labels: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, y-or-None)`` batches of up to ``n_samples`` samples of ``data``, on ``model``'s device and dtype.

    A :class:`VisionData` larger than ``n_samples`` is reduced to a class-stratified subset chosen with
    ``seed`` (:func:`~vfnb.data.calibration_subset`): the embedded MNIST is sorted by class, so its
    first images would all be one digit. Tensors and iterables are taken in order.
    """
    n_samples = _check_n(n_samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if data is None:
        raise ValueError("no data given: pass a VisionData, a tensor of inputs, or an iterable of (x, y) batches")
    move = (lambda t: t) if model is None else (lambda t: to_model(t, model))
    if isinstance(data, VisionData) or (hasattr(data, "batches") and not isinstance(data, torch.Tensor)):
        if isinstance(data, VisionData) and n_samples is not None and n_samples < len(data):
            data = calibration_subset(data, n_samples, seed=seed)
        seen = 0
        for x, y in data.batches(batch_size, augment=False):
            if n_samples is not None:
                x, y = x[:n_samples - seen], y[:n_samples - seen]
            seen += len(x)
            if len(x):
                yield move(x), y.to(x.device if model is None else _device_of(model))
            if n_samples is not None and seen >= n_samples:
                return
        return
    if isinstance(data, torch.Tensor):
        if need_labels:
            raise ValueError("this method needs labels: pass a VisionData or an iterable of (x, y) batches, not a "
                             "tensor of inputs only")
        x = data if n_samples is None else data[:n_samples]
        for start in range(0, len(x), batch_size):
            yield move(x[start:start + batch_size]), None
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a VisionData, a tensor of inputs or an iterable of x / (x, y) batches, "
                        f"got {type(data).__name__}")
    seen = 0
    for batch in data:
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"data batches must be tensors or (x, y) pairs of tensors, got {type(x).__name__}")
        if need_labels and y is None:
            raise ValueError("this method needs labels: the data batches must be (x, y) pairs")
        if n_samples is not None:
            x = x[:n_samples - seen]
            y = None if y is None else y[:len(x)]
        seen += len(x)
        if len(x):
            dev = x.device if model is None else _device_of(model)
            yield move(x), (None if y is None else torch.as_tensor(y).to(dev))
        if n_samples is not None and seen >= n_samples:
            return


def batches(data: Any, batch_size: int = 500, model: nn.Module | None = None,
            n_samples: int | None = None, seed: int = 0) -> Iterator[torch.Tensor]:
    """Input batches of ``data`` (see :func:`labelled_batches`) without labels."""
    return (x for x, _ in labelled_batches(data, batch_size, model, n_samples, seed))


def peek(data: Any, batch_size: int, model: nn.Module, what: str) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The first input batch of ``data`` (to trace ``model`` with) and an iterator over every batch, that
    first one included, so a one-shot iterable is read once. ``what`` names the caller in the error."""
    stream = batches(data, batch_size, model)
    first = next(stream, None)
    if first is None:
        raise ValueError(f"{what} needs at least one batch of data")
    return first, chain([first], stream)


def inputs(data: Any, n_samples: int | None = None, seed: int = 0) -> torch.Tensor:
    """All inputs of ``data`` (at most ``n_samples``, class-stratified for a VisionData) as one CPU tensor,
    in the data's floating dtype (float32 images); at least 2 are required for statistics."""
    xs = [x.detach().cpu() for x in batches(data, 500, None, n_samples, seed)]
    if not xs:
        raise ValueError("data is empty; statistics need at least 2 inputs")
    x = torch.cat(xs)
    if len(x) < 2:
        raise ValueError(f"statistics need at least 2 inputs, got {len(x)}")
    return x


def chunks(x: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
    """``x`` split into batches of ``batch_size`` (None: one batch)."""
    if batch_size is None:
        return [x]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or None (all inputs at once), got {batch_size!r}")
    return list(torch.split(x, batch_size))


def example_input(data: Any, example: torch.Tensor | None = None, model: nn.Module | None = None) -> torch.Tensor:
    """A batch of one input to trace a model with: ``example[:1]`` if given, else the first input of ``data``."""
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"example_input must be a tensor, got {type(example).__name__}")
        return example[:1] if model is None else to_model(example[:1], model)
    if data is None:
        raise ValueError("tracing the model needs data= or example_input= (one input of the right shape)")
    first = next(batches(data, 2, model), None)
    if first is None:
        raise ValueError("data is empty")
    return first[:1]


# ---------------------------------------------------------------------------------------------------
# two models in lock step
def _attr(model: nn.Module, target: str) -> Any:
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def lockstep(graph: fx.Graph, models: tuple[nn.Module, nn.Module], x: torch.Tensor,
             hooks: Mapping[str, Callable[[torch.Tensor, torch.Tensor], None]]) -> None:
    """Run both models node by node of ``graph`` (a trace of their common architecture) on ``x``;
    ``hooks[node_name](value_a, value_b)`` sees every captured activation as soon as it is computed
    (before any later in-place op changes it). Stops after the last captured node."""
    nodes = list(graph.nodes)
    nodes = nodes[:max(i for i, n in enumerate(nodes) if n.name in hooks) + 1] if hooks else []
    last = {n: i for i, node in enumerate(nodes) for n in node.all_input_nodes}
    envs: tuple[dict, dict] = ({}, {})
    for i, node in enumerate(nodes):
        for model, env in zip(models, envs):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            if node.op == "placeholder":
                env[node] = to_model(x, model)
            elif node.op == "get_attr":
                env[node] = _attr(model, node.target)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                env[node] = model.get_submodule(node.target)(*args, **kwargs)
        if node.name in hooks:
            hooks[node.name](envs[0][node], envs[1][node])
        for n in node.all_input_nodes:
            if last.get(n) == i:
                envs[0].pop(n, None), envs[1].pop(n, None)


class PairStats(Protocol):
    """Streaming statistics of paired activations: ``add(x, y)`` with float64 ``[units, samples]``."""

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None: ...


class CrossMoments:
    """Exact streaming Pearson correlations between two unit sets (float64 sums of x, y, x², y², xyᵀ)."""

    def __init__(self, size: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n, self.sx, self.sy, self.sxx, self.syy, self.sxy = 0, z(size), z(size), z(size), z(size), z(size, size)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.n += x.shape[1]
        self.sx += x.sum(1)
        self.sy += y.sum(1)
        self.sxx += torch.linalg.vector_norm(x, dim=1).square()
        self.syy += torch.linalg.vector_norm(y, dim=1).square()
        self.sxy += x @ y.T

    def std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population std of each unit of x and of y."""
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        return ((self.sxx / n - mx * mx).clamp_min(0).sqrt().cpu(), (self.syy / n - my * my).clamp_min(0).sqrt().cpu())

    def constant(self, rtol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit of x and of y: True where its variance on the data is zero (up to rounding: below
        ``rtol`` times its mean square), e.g. a ReLU that never fires."""
        n = max(self.n, 1)
        out = []
        for s, ss in ((self.sx, self.sxx), (self.sy, self.syy)):
            mean_sq = ss / n
            var = mean_sq - (s / n) ** 2
            out.append((var <= rtol * mean_sq.clamp_min(1e-300)).cpu())
        return out[0], out[1]

    def corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation matrix ``[x units, y units]``; zero-variance units get 0, never NaN."""
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - torch.outer(mx, my)
        sx = (self.sxx / n - mx * mx).clamp_min(0).add(eps).sqrt()
        sy = (self.syy / n - my * my).clamp_min(0).add(eps).sqrt()
        return (cov / torch.outer(sx, sy)).cpu()


class JointMoments:
    """Streaming float64 moments of the stacked activations ``z = [x; y]`` (Σz, Σzzᵀ, min, max)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.n = size, 0
        self.s = torch.zeros(2 * size, dtype=torch.float64, device=device)
        self.ss = torch.zeros(2 * size, 2 * size, dtype=torch.float64, device=device)
        self.lo = torch.full((2 * size,), math.inf, dtype=torch.float64, device=device)
        self.hi = torch.full((2 * size,), -math.inf, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        z = torch.cat([x, y])
        self.n += z.shape[1]
        self.s += z.sum(1)
        self.ss += z @ z.T
        self.lo = torch.minimum(self.lo, z.min(1).values)
        self.hi = torch.maximum(self.hi, z.max(1).values)

    def merge(self, other: JointMoments) -> None:
        """Add ``other``'s samples (pooling several capture points of one group)."""
        self.n += other.n
        self.s += other.s
        self.ss += other.ss
        self.lo = torch.minimum(self.lo, other.lo)
        self.hi = torch.maximum(self.hi, other.hi)

    def covariance(self) -> torch.Tensor:
        """The (2n × 2n) population covariance of ``z``, on the CPU."""
        n = max(self.n, 1)
        m = self.s / n
        return (self.ss / n - torch.outer(m, m)).cpu()

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Σ_xx, Σ_xy, Σ_yy)``."""
        cov, d = self.covariance(), self.size
        return cov[:d, :d], cov[:d, d:], cov[d:, d:]


class _Float64Views:
    """Two reusable float64 buffers: an activation chunk is copied (and converted) into one in a
    single pass, as ``[units, samples]``, without allocating fresh memory for every batch."""

    def __init__(self) -> None:
        self.flat = [torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]

    def __call__(self, i: int, t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
        moved = t.movedim(axis, 0)
        if self.flat[i].numel() < moved.numel() or self.flat[i].device != t.device:
            self.flat[i] = torch.empty(moved.numel(), dtype=torch.float64, device=t.device)
        return self.flat[i][:moved.numel()].view(moved.shape).copy_(moved).view(size, -1)


def _projected(model: nn.Module, c: Any, take: Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ take(W[start:stop] x + b[start:stop])`` on axis ``c.axis``, with ``model``'s own weight rows
    (``c.proj``): the q, k or v units of an attention, from the value its projection reads."""
    key, bkey, lo, hi = c.proj
    state = model.state_dict()
    w, b = state[key][lo:hi].detach(), None if bkey is None else state[bkey][lo:hi].detach()

    def proj(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.movedim(c.axis, -1), w.to(x), None if b is None else b.to(x)).movedim(-1, c.axis)
        return y if take is None else take(y)
    return proj


def _pair_hook(stats: PairStats, axis: int, size: int, views: _Float64Views, prev=None, chunk: int = 1 << 22,
               take: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Feed an activation pair to ``stats`` as float64 ``[size, samples]``, in chunks of the batch axis
    (``take`` first selects the captured units when they do not fill the axis in order)."""
    def hook(a: torch.Tensor, b: torch.Tensor) -> None:
        if prev is not None:
            prev(a, b)
        if take is not None:
            ta, tb = take if isinstance(take, tuple) else (take, take)
            a, b = ta(a), tb(b)
        step = max(1, chunk // max(1, a[:1].numel())) if axis else a.shape[0]
        for i in range(0, a.shape[0], step):
            stats.add(views(0, a[i:i + step], axis, size), views(1, b[i:i + step], axis, size))
    return hook


@torch.no_grad()
def collect_paired(model_a: nn.Module, model_b: nn.Module, spec: Any, groups: Sequence[int],
                   batches: Iterable[torch.Tensor], make_stats: Callable[[int, torch.device], PairStats],
                   max_batches: int | None = None) -> dict[tuple[int, str], PairStats]:
    """Statistics of the two models' activations at every capture point of ``groups`` of ``spec`` (a
    :class:`~vfnb.graph.PermutationSpec`), from one lock-step pass over ``batches`` in eval mode:
    ``{(group index, fx node): make_stats(units, device)}`` fed with float64 ``[units, samples]``
    (every position of a conv map is a sample). The models' train/eval modes are restored."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be an integer >= 1 or None, got {max_batches!r}")
    device = _device_of(model_a)
    if _device_of(model_b) != device:
        raise ValueError("model_a and model_b must be on the same device to capture their activations together")
    stats: dict[tuple[int, str], PairStats] = {}
    hooks: dict[str, Callable] = {}
    views = _Float64Views()
    for gi in groups:
        g = spec.groups[gi]
        for c in g.captures:
            stats[(gi, c.node)] = m = make_stats(g.size, device)
            take = None if c.positions is None else c.take
            if c.proj is not None:  # units inside a module: project its input with each model's own rows
                take = tuple(_projected(mod, c, take) for mod in (model_a, model_b))
            hooks[c.node] = _pair_hook(m, c.axis, g.size, views, hooks.get(c.node), take=take)
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    seen = 0
    try:
        for i, x in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            lockstep(spec.graph, (model_a, model_b), x, hooks)
            seen += 1
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])
    if not seen:
        raise ValueError("no data: capturing activations needs at least one batch")
    return stats


# ---------------------------------------------------------------------------------------------------
# per-channel moments of one model
def batch_moments(y: torch.Tensor, axis: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel (count, mean, population variance) of one batch along ``axis``: Welford in the
    activation's dtype, returned in float64."""
    var, mean = torch.var_mean(y.detach(), dim=[d for d in range(y.dim()) if d != axis], correction=0)
    return y.numel() // y.shape[axis], mean.double(), var.double()


def merge_moments(a: tuple[int, torch.Tensor, torch.Tensor] | None,
                  b: tuple[int, torch.Tensor, torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Combine two (count, mean, variance) summaries exactly (Chan et al.'s parallel update)."""
    if a is None:
        return b
    na, ma, va = a
    nb, mb, vb = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), (va * na + vb * nb + delta * delta * (na * nb / n)) / n


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The outputs of the named modules for input ``x`` (one forward pass in eval mode; the mode is
    restored). A name ``"<module>:input"`` reads the module's (first) input instead: e.g. the residual
    stream of a pre-norm transformer where it enters a LayerNorm."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    missing = [n for n in names if n.partition(":")[0] not in modules or n.partition(":")[2] not in ("", "input")]
    if missing:
        raise ValueError(f"model has no module(s) {missing} (a name is a module's, optionally with ':input')")
    def first_input(n: str):
        def hook(m, args, kwargs) -> None:
            t = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
            if t is not None:
                out[n] = t.detach()
        return hook
    hooks = []
    for n in names:
        mod, _, what = n.partition(":")
        if what == "input":
            hooks.append(modules[mod].register_forward_pre_hook(first_input(n), with_kwargs=True))
        else:
            hooks.append(modules[mod].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach())))
    was_training = model.training
    try:
        model.eval()(to_model(x, model))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    silent = [n for n in names if n not in out]
    if silent:
        raise ValueError(f"module(s) {silent} never ran (or got no tensor input) in the forward pass: a container "
                         "whose children are called directly, as in a traced PFM model, has no output of its own; "
                         "name a leaf module")
    return out
