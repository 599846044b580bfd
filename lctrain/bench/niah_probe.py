"""Retrieval probe: does a model config learn S-NIAH-1 from the embedded needle data? (issue 5 research)

One run = the real config (`load_config` + overrides), the embedded dataset's sample builder
(`build_embedded_samples`, answer masks included), the training `Trainer` without its loader (its
model, optimizer, schedule and `step`: loss with train.answer_loss_weight, clipping), batches from
memory in a seeded shuffled order (no MDS, no streaming),
float32 and the chunkwise torch kernels, then `run_niah` on S-NIAH-1 at the training length with the
RULER and the train template. Prints one JSON line: eval accuracy, mean loss and mean answer-token
loss per 50 steps. Many runs fit on one GPU at once (tiny models), which is how docs/eval-notes.md's
tables were measured:

    python -m lctrain.bench.niah_probe NAME '{"overrides": ["train.seed=7"], "extra_lengths": [2048]}'

Keys: overrides (config key=value list), device (cuda|cpu), samples (per depth), extra_lengths
(RULER-template lengths beyond seq_len, 3 depths x 4 samples), threads, digits / packed_share (passed to the
embedded sample builder; its NEEDLE_DIGITS / PACKED_NEEDLE_SHARE when left out).
"""
from __future__ import annotations

import json
import random
import sys
import time

import numpy as np
import torch

DEFAULTS = dict(overrides=[], device="cuda", samples=10, extra_lengths=[], threads=1, order_seed=0,
                digits=None, packed_share=None)


def _accuracy(records) -> tuple[float, list[int]]:
    by_depth: dict = {}
    for r in records:
        by_depth.setdefault(r["depth"], []).append(r["score"])
    mean = 100 * sum(r["score"] for r in records) / len(records)
    return round(mean, 1), [round(100 * sum(v) / len(v)) for _, v in sorted(by_depth.items())]


def run(name: str, opts: dict) -> dict:
    from lctrain.config import load_config
    from lctrain.data import embedded
    from lctrain.data.tokenizer import get_tokenizer
    from lctrain.eval.niah import run_niah
    from lctrain.train.trainer import Trainer

    c = dict(DEFAULTS, **opts)
    torch.set_num_threads(int(c["threads"]))
    cfg = load_config(None, ["model.kernel_backend=torch", "train.dtype=float32", *c["overrides"]])
    dev = torch.device(c["device"] if torch.cuda.is_available() else "cpu")
    mix = {k: v for k, v in (("digits", c["digits"]), ("packed_share", c["packed_share"])) if v is not None}
    tok = get_tokenizer(cfg.data)
    t, L, mb = cfg.train, int(cfg.data.seq_len), int(cfg.data.micro_batch_size)
    samples, masks = embedded.build_embedded_samples(tok, L, t.steps * mb, float(cfg.data.needle_fraction),
                                                     int(cfg.data.seed),
                                                     **mix)
    order = list(range(len(samples)))
    random.Random(c["order_seed"]).shuffle(order)
    trainer = Trainer(cfg, dev, data=False)  # the model, optimizer, schedule and step of `lctrain train`
    model = trainer.model
    losses, answer_losses, start = [], [], time.time()
    model.train()
    for step in range(t.steps):
        rows = order[step * mb:(step + 1) * mb]
        batch = torch.as_tensor(np.stack([samples[i] for i in rows]).astype(np.int64)).to(dev)
        mask = torch.as_tensor(np.stack([masks[i] for i in rows]).astype(np.int64))[:, 1:].to(dev)
        metrics = trainer.step([{"input_ids": batch[:, :-1], "labels": batch[:, 1:], "answer_mask": mask}])
        losses.append(metrics.loss)
        if mask.any():
            with torch.no_grad():  # the answer tokens' plain loss (a second forward: probes only)
                logits = model(batch[:, :-1])
                per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                              batch[:, 1:].reshape(-1), reduction="none")
                answer_losses.append(float(per_token[mask.reshape(-1) > 0].mean()))
    train_s = time.time() - start
    model.eval()
    out = dict(name=name, train_s=round(train_s, 1))
    for template in ("ruler", "train"):
        records = run_niah(model, tok, tasks=["s_niah_1"], lengths=[L], depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                           samples=int(c["samples"]), template=template, seed=0, log=None)
        out[template], out[f"{template}_by_depth"] = _accuracy(records)
    for length in c["extra_lengths"]:
        records = run_niah(model, tok, tasks=["s_niah_1"], lengths=[int(length)], depths=[0.0, 0.5, 1.0], samples=4,
                           template="ruler", seed=0, log=None)
        out[f"ruler{length}"] = _accuracy(records)[0]
    per50 = lambda xs: [round(sum(xs[i:i + 50]) / len(xs[i:i + 50]), 2) for i in range(0, len(xs), 50)]  # noqa: E731
    return dict(out, loss=per50(losses), answer_loss=per50(answer_losses), opts=c)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(run(argv[0], json.loads(argv[1]) if len(argv) > 1 else {})), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
