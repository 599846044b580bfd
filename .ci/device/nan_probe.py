"""Where does a run's first non-finite gradient come from? (a device diagnostic, one process)

    python3 .ci/device/nan_probe.py OUTDIR [RECIPE] OVERRIDE... [--max-steps N]

Trains as `lctrain train RECIPE OVERRIDE...` would (same seed, data, schedule, dtype) until a step's
gradient is not finite (at most --max-steps steps), then, on that step's batch and the weights before it:
- names the parameters whose gradient is not finite;
- walks the blocks and their sub-modules with hooks and names each module whose output gradient is
  finite but whose input gradient is not (where the NaN/Inf is born in the backward), and each module
  whose forward output is not finite;
- replays the batch with the same weights in float32, and in the step's dtype on the torch kernels
  (model.kernel_backend=torch): finite or not, and the gradient norm of each;
- saves the batch, the weights and the config (OUTDIR/nan_case.pt) for a replay on another machine.
Prints a report and writes OUTDIR/nan_probe.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf


def _finite(t) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def _grads_finite(params) -> tuple[bool, float]:
    sq = 0.0
    ok = True
    for p in params:
        if p.grad is not None:
            g = p.grad.float()
            ok &= bool(torch.isfinite(g).all())
            sq += float((g.nan_to_num(0, 0, 0) ** 2).sum())
    return ok, math.sqrt(sq)


def _bad_params(model) -> list[str]:
    """The names of the parameters whose gradient is not finite."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not _finite(p.grad)]


def _set_backend(model, backend: str) -> None:
    for m in model.modules():
        if hasattr(m, "backend") and isinstance(m.backend, str):
            m.backend = backend


def _hook_modules(model, births: list, fwd_bad: list):
    handles = []
    for name, mod in model.named_modules():
        if not name:  # the model itself: its input is token ids
            continue

        def bwd(m, gin, gout, name=name):
            if all(_finite(g) for g in gout) and not all(_finite(g) for g in gin):
                births.append(name)

        def fwd(m, inp, out, name=name):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not all(_finite(o) for o in outs if isinstance(o, torch.Tensor)):
                fwd_bad.append(name)

        handles.append(mod.register_full_backward_hook(bwd))
        handles.append(mod.register_forward_hook(fwd))
    return handles


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("args", nargs="*", help="[RECIPE] OVERRIDE...")
    ap.add_argument("--max-steps", type=int, default=200)
    ns = ap.parse_args(argv)
    from lctrain.parallel import mesh

    from lctrain.config import load_config, split_recipe_and_overrides
    from lctrain.train.device import pick_device
    from lctrain.train.trainer import Trainer, _Infinite

    recipe, overrides = split_recipe_and_overrides(ns.args)
    cfg = load_config(recipe, overrides)
    out = Path(ns.outdir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.train)
    mesh.init_mesh(cfg.parallel, device)
    tr = Trainer(cfg, device)
    batches = _Infinite(tr.loader)
    tr.model.train()
    report: dict = {"overrides": overrides, "recipe": recipe}
    for step in range(1, ns.max_steps + 1):
        bs = [next(batches) for _ in range(cfg.train.grad_accum)]
        before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
        loss = float(tr.forward_backward(bs))
        ok, norm = _grads_finite(tr.params)
        if ok and math.isfinite(loss):
            tr.finish_gradients()
            tr.optimizer_step(apply=True)
            if step % 10 == 0:
                print(f"step {step}: loss {loss:.4f}, grad norm {norm:.3f}", flush=True)
            continue
        print(f"step {step}: loss {loss}, gradient not finite", flush=True)
        report.update(step=step, loss=loss, bad_params=_bad_params(tr.model))
        torch.save({"state": {k: v.cpu() for k, v in before.items()}, "batches": bs,
                    "config": OmegaConf.to_container(cfg)}, out / "nan_case.pt")
        tr.optimizer.zero_grad(set_to_none=True)
        births, fwd_bad = [], []
        handles = _hook_modules(tr.model, births, fwd_bad)
        tr.forward_backward(bs)
        for h in handles:
            h.remove()
        report.update(backward_births=births, forward_not_finite=fwd_bad)
        replays, step_dtype = {}, tr.dtype
        for label, dtype, backend in (("float32", torch.float32, cfg.model.kernel_backend),
                                      (f"{tr.dtype} torch kernels", tr.dtype, "torch"),
                                      (f"{tr.dtype} again", tr.dtype, cfg.model.kernel_backend)):
            tr.optimizer.zero_grad(set_to_none=True)
            _set_backend(tr.model, backend)
            tr.dtype = dtype
            try:
                rl = float(tr.forward_backward(bs))
                rok, rnorm = _grads_finite(tr.params)
                replays[label] = {"loss": rl, "finite": rok, "grad_norm": rnorm,
                                  "bad_params": _bad_params(tr.model)[:20]}
            except Exception as e:  # report, do not stop: the other replays still tell
                replays[label] = {"error": f"{type(e).__name__}: {e}"}
            finally:
                tr.dtype = step_dtype
                _set_backend(tr.model, cfg.model.kernel_backend)
        report["replays"] = replays
        break
    else:
        report["step"] = None
        print(f"no non-finite gradient in {ns.max_steps} steps")
    (out / "nan_probe.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    mesh.destroy_mesh()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
