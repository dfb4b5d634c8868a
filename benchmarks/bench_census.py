"""Census of the alignment engine over torchvision's classification models (issue 13).

For every classification constructor in ``torchvision.models`` (80 in torchvision 0.29), with random
weights (``weights=None`` after ``torch.manual_seed(0)``), in eval mode, on one random input of
1×3×224×224 (299×299 for ``inception_v3``):

1. ``spec = vfnb.graph.permutation_spec(model, x)`` (float32);
2. ``perm = vfnb.graph.random_permutation(spec, seed=1)``;
3. ``new = vfnb.graph.apply_permutation(model, perm)`` on a float64 copy of the model, and the
   permuted model must compute the same function: ``max|f(x) − f_π(x)| / max|f(x)| < 1e-5``, with
   model and input in float64 so that float32 rounding cannot decide the verdict.

Before step 1 every parameter that torchvision initializes to a constant (zero biases, unit norm
scales, ViT's zero class token and zero head, ConvNeXt's layer scale of 1e-6) and the BatchNorm
running statistics get random values (seeded): with those constants a wrongly permuted bias or norm
scale changes nothing, a zero head makes f ≡ 0, and a 1e-6 layer scale hides a wrong permutation
inside a ConvNeXt block below the 1e-5 threshold. ``--no-desymmetrize`` keeps torchvision's values.

Each model ends as one of

- ``PASS``      the permuted model computes the same function (``nontriv`` says whether any group
                has more than one unit, i.e. whether anything was actually permuted);
- ``REFUSED``   the engine raised :class:`vfnb.validate.UnsupportedOperationError`;
- ``CRASH``     any other exception (its type and message are printed);
- ``MISMATCH``  the spec was built but the permuted model computes another function: a bug.

One line per model (name, status, seconds for steps 1-3, number of groups, the largest group, the
relative error, the start of the error message), then "N of M pass" and the refusal reasons grouped
by their first words. The exit status is 1 if any model ended in CRASH or MISMATCH, else 0.

Run (the full census takes long on a 2-core machine; large models need ~10 GB of RAM in float64)::

    .venv/bin/python benchmarks/bench_census.py --skip-large --json census.json
    .venv/bin/python benchmarks/bench_census.py --only resnet18,mobilenet_v3_small,squeezenet1_0,alexnet

``--skip-large`` skips the four constructors over 300M parameters (regnet_y_128gf, vit_h_14,
vit_l_16, vit_l_32); ``--json PATH`` writes all results, rewritten atomically after every model.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.models import get_model, get_model_weights, list_models
from tqdm.auto import tqdm

import vfnb.graph
from vfnb.validate import UnsupportedOperationError

TOLERANCE = 1e-5
LARGE = 300_000_000
#: Constructor arguments: without them googlenet and inception_v3 build auxiliary heads (which eval mode
#: skips, but the trace does not) and run scipy's slow truncated-normal init.
EXTRA: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False, "init_weights": False},
                                    "inception_v3": {"aux_logits": False, "init_weights": False}}
INPUT_SIZE: dict[str, int] = {"inception_v3": 299}
MESSAGE_CHARS = 160
REASON_WORDS = 6


def num_params(name: str) -> int | None:
    """The constructor's parameter count, from its weights' metadata (nothing is built or downloaded)."""
    try:
        return int(next(iter(get_model_weights(name))).meta["num_params"])
    except Exception:  # noqa: BLE001 - a constructor without published weights: unknown
        return None


@torch.no_grad()
def desymmetrize(model: torch.nn.Module, seed: int) -> int:
    """Replace every constant floating parameter ``c`` by ``c + 0.1·N(0, 1)`` and every BatchNorm
    running variance by U(0.5, 1.5) and running mean by 0.1·N(0, 1); return how many tensors changed."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    changed = 0
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or not t.is_floating_point() or t.numel() == 0:
            continue
        seen.add(id(t))
        leaf = key.rsplit(".", 1)[-1]
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if leaf == "running_var":
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
        elif leaf == "running_mean":
            t.copy_(0.1 * noise)
        elif isinstance(t, torch.nn.Parameter) and bool((t == t.reshape(-1)[0]).all()):
            t.add_(0.1 * noise)
        else:
            continue
        changed += 1
    return changed


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    raise TypeError(f"model output of type {type(out).__name__}")


def _max_abs(ts: list[torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in ts)


def check_model(name: str, desym: bool = True) -> dict[str, Any]:
    """Steps 1-3 of the module docstring for one constructor; never raises."""
    rec: dict[str, Any] = {"name": name, "status": None, "seconds": None, "groups": None, "max_group": None,
                           "nontrivial": None, "rel_error": None, "error": None, "params": None,
                           "build_seconds": None}
    model = new = spec = perm = None
    stage = "build"
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = get_model(name, weights=None, **EXTRA.get(name, {})).eval()
        rec["params"] = sum(p.numel() for p in model.parameters())
        if desym:
            desymmetrize(model, seed=0)
        size = INPUT_SIZE.get(name, 224)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        rec["build_seconds"] = round(time.perf_counter() - t0, 3)

        t0 = time.perf_counter()
        stage = "permutation_spec"
        spec = vfnb.graph.permutation_spec(model, x)
        sizes = [g.size for g in spec.groups]
        rec["groups"], rec["max_group"] = len(sizes), max(sizes, default=0)
        rec["nontrivial"] = any(s > 1 for s in sizes)
        stage = "random_permutation"
        perm = vfnb.graph.random_permutation(spec, seed=1)
        stage = "apply_permutation"
        model.double()  # in place: a float64 copy would hold three models at once for the largest ones
        new = vfnb.graph.apply_permutation(model, perm)
        stage = "forward"
        x64 = x.double()
        with torch.no_grad():
            ref = _tensors(model(x64))
            got = _tensors(new(x64))
        if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
            raise RuntimeError("the permuted model's output has another structure")
        err = max(float((r - g).abs().max()) for r, g in zip(ref, got))
        scale = _max_abs(ref)
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["rel_error"] = rel
        rec["status"] = "PASS" if rel < TOLERANCE else "MISMATCH"
        if scale == 0:
            rec["error"] = "the model's output is identically zero: the comparison is vacuous"
        elif rec["status"] == "MISMATCH":
            rec["error"] = f"max|f(x) - f_perm(x)| / max|f(x)| = {rel:.3g} >= {TOLERANCE:g}"
    except UnsupportedOperationError as exc:
        rec["status"], rec["error"] = "REFUSED", " ".join(str(exc).split())
    except Exception as exc:  # noqa: BLE001 - the census reports every failure and goes on
        rec["status"] = "CRASH"
        rec["error"] = f"{type(exc).__name__} in {stage}: " + " ".join(str(exc).split())
    finally:
        if rec["seconds"] is None and rec["build_seconds"] is not None:
            rec["seconds"] = round(time.perf_counter() - t0, 3)
        del model, new, spec, perm
        gc.collect()
    return rec


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_line(rec: dict[str, Any], width: int) -> str:
    secs = "-" if rec["seconds"] is None else f"{rec['seconds']:7.2f}s"
    groups = "-" if rec["groups"] is None else str(rec["groups"])
    biggest = "-" if rec["max_group"] is None else str(rec["max_group"])
    rel = "-" if rec["rel_error"] is None else f"{rec['rel_error']:.1e}"
    msg = (rec["error"] or "")[:MESSAGE_CHARS]
    return (f"{rec['name']:<{width}} {rec['status']:<8} {secs:>8} groups {groups:>4} max {biggest:>5} "
            f"rel {rel:>7}  {msg}")


def reason(message: str) -> str:
    """The first words of a refusal message, the key that groups refusals in the summary."""
    return " ".join(message.split()[:REASON_WORDS])


def summary(records: list[dict[str, Any]]) -> str:
    count = collections.Counter(r["status"] for r in records)
    passed = [r for r in records if r["status"] == "PASS"]
    lines = [f"{len(passed)} of {len(records)} pass "
             f"({sum(bool(r['nontrivial']) for r in passed)} of them permute at least one group of > 1 unit); "
             + ", ".join(f"{k} {count[k]}" for k in ("PASS", "REFUSED", "CRASH", "MISMATCH") if count[k])]
    for status in ("REFUSED", "CRASH"):
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for r in records:
            if r["status"] == status:
                groups[reason(r["error"])].append(r["name"])
        if groups:
            lines.append(f"\n{status} by reason (first {REASON_WORDS} words):")
            for why, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                lines.append(f"  {len(names):3d}  {why}  [{', '.join(names)}]")
    mism = [r["name"] for r in records if r["status"] == "MISMATCH"]
    if mism:
        lines.append(f"\nMISMATCH (the permuted model computes another function): {', '.join(mism)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated constructor names (default: all classification models)")
    ap.add_argument("--skip-large", action="store_true", help=f"skip constructors over {LARGE // 10**6}M parameters")
    ap.add_argument("--json", type=Path, help="write the results here (atomically, after every model)")
    ap.add_argument("--no-desymmetrize", action="store_true",
                    help="keep torchvision's constant initial values (zero biases, zero ViT head, ...)")
    args = ap.parse_args(argv)

    names = list_models(module=torchvision.models)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            ap.error(f"not torchvision classification models: {', '.join(unknown)}")
        names = wanted
    skipped = []
    if args.skip_large:
        skipped = [n for n in names if (num_params(n) or 0) > LARGE]
        names = [n for n in names if n not in skipped]
        if skipped:
            print(f"skipping {len(skipped)} models over {LARGE // 10**6}M parameters: {', '.join(skipped)}")

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads; "
          f"{len(names)} models; pass: relative error < {TOLERANCE:g} in float64")
    width = max(map(len, names), default=0)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(names, unit="model", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        rec = check_model(name, desym=not args.no_desymmetrize)
        records.append(rec)
        tqdm.write(format_line(rec, width))
        if args.json:
            write_json(args.json, {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                   "tolerance": TOLERANCE, "desymmetrized": not args.no_desymmetrize,
                                   "skipped_large": skipped, "complete": len(records) == len(names),
                                   "results": records})
    bar.close()
    print()
    print(summary(records))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return int(any(r["status"] in ("CRASH", "MISMATCH") for r in records))


if __name__ == "__main__":
    sys.exit(main())
