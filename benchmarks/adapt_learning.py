"""Can the ``adapt`` projector learn? Trains it outside Lightning (plain Adam, fp32, CPU) and prints the patch
AUROC of the projected compressed norm (FeatureNorm's score) next to the raw residual's, on three fixed sets:
``seen`` (the first ``--evals`` training batches, which the run trains on; with ``--fixed``, that batch),
``unseen`` (other batches of the training classes) and ``heldout`` (the validation classes), each as the
training sees it (``view``: photometric view 0) and as ``ad_eval`` does (``plain``: the anomalous image
against unjittered references).

    python3 benchmarks/adapt_learning.py jobs/adapt/cpu_r18.yaml --steps 300 --lr 1e-3 [--fixed 3] \
        [--set jitter_references=false]

``--fixed B`` trains on batch B only (the overfit test). One line per evaluation; RESULTS.md, "Can the
projector learn?".
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import yaml

from fractal_pretrain.adapt.losses import compressed_norm, flat, norm_labels, total_loss
from fractal_pretrain.adapt.model import AdaptModule, patch_auroc


def aurocs(module, batches, slot: int) -> dict[str, tuple[float, float]]:
    """{layer: (raw, projected)} patch AUROC pooled over ``batches``, input ``slot`` (0 view, 2 plain)."""
    parts: dict[str, list] = {name: [] for name in module.layers}
    with torch.no_grad():
        for residuals, mask, _ in batches:
            projected = module.projector(residuals[slot])
            for name, e in projected.items():
                labels = norm_labels(mask, tuple(e.shape[-2:])).flatten()
                parts[name].append((compressed_norm(flat(residuals[slot][name])), compressed_norm(flat(e)), labels))
    out = {}
    for name, rows in parts.items():
        raw, proj, labels = (torch.cat(c) for c in zip(*rows, strict=True))
        out[name] = (patch_auroc(raw, labels), patch_auroc(proj, labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--fixed", type=int, default=None, help="train on this batch number only")
    parser.add_argument("--evals", type=int, default=16, help="batches per evaluation set")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], help="model KEY=VALUE (YAML value)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with open(args.config) as handle:
        model = yaml.safe_load(handle)["model"]
    for item in args.set:
        key, value = item.split("=", 1)
        model[key] = yaml.safe_load(value)
    module = AdaptModule(**model)
    module.setup("fit")
    module.compute_centers()
    seen = [args.fixed] if args.fixed is not None else list(range(args.evals))
    sets = {"seen": [module.make_batch(b, val=False, plain=True) for b in seen],
            "unseen": [module.make_batch(10**6 + b, val=False, plain=True) for b in range(args.evals)],
            "heldout": [module.make_batch(b, val=True, plain=True) for b in range(args.evals)]}

    def report(step: int, loss: float, start: float) -> None:
        cells = []
        for name, batches in sets.items():
            for kind, slot in (("view", 0), ("plain", 2)):
                for layer, (raw, proj) in aurocs(module, batches, slot).items():
                    cells.append(f"{name}/{kind}/{layer} {raw:.3f}->{proj:.3f}")
        print(f"step {step} loss {loss:.3f} t {time.perf_counter() - start:.0f}s | " + " ".join(cells), flush=True)

    optimizer = torch.optim.Adam(module.projector.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start, losses = time.perf_counter(), []
    report(0, float("nan"), start)
    for step in range(1, args.steps + 1):
        number = step - 1 if args.fixed is None else args.fixed
        if number in seen:
            residuals, mask, _ = sets["seen"][seen.index(number)]
        else:
            residuals, mask, _ = module.make_batch(number, val=False)
        e1, e2 = (module.projector(r) for r in residuals[:2])
        loss = total_loss(e1, e2, mask, module.centers())
        if loss is not None:  # a batch without anomalies is skipped, as in training
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if step % args.every == 0:
            report(step, float(np.mean(losses[-args.every:])) if losses else float("nan"), start)


if __name__ == "__main__":
    main()
