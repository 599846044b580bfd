"""Context parallelism on 2 GPUs with NCCL (`python -m pytest -m gpu tests/test_cp_gpu.py`).

One process per GPU (tests/dist_utils.run_world, NCCL, rank r on cuda:r). In bfloat16, each rank's
outputs and gradients must equal the plain op run by one GPU on the whole sequence in float32
(relative error of the norm <= 2e-2): every linear mixer under ``context_parallel`` with every
transition (sequential, its skip-nothing reference sequential_all, grouped, grouped+grad, overlap,
pipeline; gla also direct), with an initial state and a gradient on every rank's final state, and
sequential, overlap and pipeline also without the final-state gradients (then the last rank runs no
transition at all and overlap's last rank the plain reverse pass; a case that raises fails its own
test only); the short
conv through the halo exchange; sliding-window attention through the halo exchange; global
attention through Ulysses (skipped when DeepSpeed is not installed); a training step of a float32
G/D/M model (Triton, full checkpointing) with the default transition, which runs pipeline there; log-linear
Gated DeltaNet (backend "triton": both ranks through the transition tree, rank 1 from an incoming level state; also
with no final states asked for, as in training).

Where one GPU is all there is, ``CP_GPU_ONE_DEVICE=1`` puts both ranks on cuda:0 and joins them over gloo (the
collectives travel through host copies): the same comparisons, so the compiled kernels' CP paths are checked, but
nothing about NCCL or speed. ``CP_GPU_CASES=loglinear,conv`` runs only the cases named (the tests of the others are
skipped and say so); by default every case runs.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_world

P = 2
ONE_DEVICE = os.environ.get("CP_GPU_ONE_DEVICE") == "1"   # both ranks on cuda:0, gloo (correctness only)
GPUS = 1 if ONE_DEVICE else P
CASES = [c for c in os.environ.get("CP_GPU_CASES", "").split(",") if c]   # empty: every case
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < GPUS,
                                 reason=f"needs {GPUS} CUDA GPU(s)")]
TOL = 2e-2
KINDS = {"delta": ("delta_rule", ("beta",)), "gated_delta": ("gated_delta_rule", ("g", "beta")),
         "gla": ("gated_linear_attn", ("g",))}
TRANSITIONS = ("sequential", "sequential_all", "grouped:4", "grouped+grad:4")
# (kind, transition) of every linear case: each transition for each kind, and gla's closed form
LINEAR_CASES = [(kind, t) for kind in KINDS for t in TRANSITIONS + ("overlap", "pipeline")] + [("gla", "direct")]
# (kind, transition) run without a loss on the returned final states as well
UNWEIGHTED_CASES = [("gated_delta", "sequential"), ("gated_delta", "overlap"), ("gla", "overlap"),
                    ("gated_delta", "pipeline")]
FUSED_KINDS = ("gated_delta", "delta")  # overlap with its forward fix-up inside output_fwd (launch key fuse_out=1)
B, TL, H, D = 1, 512, 4, 128            # 8 chunks of 64 per rank
CONV = (B, TL, 256, 4)                   # batch, tokens per rank, channels, kernel size
ATTN = dict(H=4, D=64, TL=1024, window=256)
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _full_inputs(kind, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    T = P * TL
    x = dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
             g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)),
             init=r(B, H, D, D), do=r(B, T, H, D), w_state=[r(B, H, D, D) for _ in range(P)])
    return x


def _linear_case(rank, kind, transition, device, weigh_states=True):
    """Returns {name: rel error} of this rank's CP results against one GPU on the whole sequence
    (``weigh_states``: the loss also weighs every rank's returned final state)."""
    import torch.distributed as dist
    from lctrain.parallel import context_parallel

    from lctrain import kernels

    name, extra = KINDS[kind]
    op = getattr(kernels, name)
    x = _full_inputs(kind, seed=len(kind) * 7 + len(transition), device=device)
    names = ("q", "k", "v") + extra
    sl = slice(rank * TL, (rank + 1) * TL)

    # one GPU, float32 through the chunkwise torch backend (the Triton kernels refuse float32 at head dim 128 on a
    # GPU: ops.gpu_refusal), the whole sequence as P consecutive calls chained through the state, so
    # that every shard's outgoing state can carry a loss term as under CP
    full = {n: x[n].clone().requires_grad_() for n in names}
    init = x["init"].clone().requires_grad_()
    state, outs, states, loss = init, [], [], 0.0
    for r in range(P):
        s = slice(r * TL, (r + 1) * TL)
        o, state = op(*(full[n][:, s] for n in names), initial_state=state, output_final_state=True, backend="torch")
        outs.append(o)
        states.append(state)
        loss = loss + (o * x["do"][:, s]).sum() + (state * x["w_state"][r]).sum() * weigh_states
    loss.backward()

    # CP, bfloat16 activations (g stays float32 as in the model)
    loc = {n: (x[n][:, sl].to(torch.bfloat16) if n != "g" else x[n][:, sl]).clone().requires_grad_() for n in names}
    init_cp = x["init"].clone().requires_grad_()
    cp = context_parallel(op, dist.group.WORLD, transition=transition)
    o, s_out = cp(*(loc[n] for n in names), initial_state=init_cp, output_final_state=True)
    loss = (o.float() * x["do"][:, sl]).sum()
    (loss + (s_out * x["w_state"][rank]).sum() if weigh_states else loss).backward()
    err = {"o": rel(o, outs[rank]), "state": rel(s_out, states[rank])}
    for n in names:
        err["d" + n] = rel(loc[n].grad, full[n].grad[:, sl])
    if rank == 0:
        err["d initial_state"] = rel(init_cp.grad, init.grad)
    return err


def _loglinear_case(rank, device, want_states=True):
    """Log-linear Gated DeltaNet under CP, backend "triton" in bfloat16, against one GPU in float32 (backend "torch")
    over the whole sequence chained through the level states (as tests/test_loglinear_cp.py does on the CPU):
    outputs, every rank's final level states and every gradient. 8 chunks a rank: both ranks take the transition
    tree (checked), rank 1 with the level of 16 chunks continuing from rank 0 (its incoming state). Without
    ``want_states`` (as in training) no rank asks for its final states and the loss is on the outputs alone."""
    import torch.distributed as dist
    from lctrain.kernels.loglinear import fused, transition_tree
    from lctrain.parallel import context_parallel

    from lctrain import kernels
    T = P * TL
    L = kernels.levels_needed(T)
    gen = torch.Generator(device=device).manual_seed(17)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = dict(q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D), g=F.logsigmoid(r(B, T, H) + 5.0),
             beta=torch.sigmoid(r(B, T, H)), level_weights=F.softplus(r(B, T, H, L)))
    do, w_state = r(B, T, H, D), [r(B, H, L, D, D) for _ in range(P)]
    names = ("q", "k", "v", "g", "beta", "level_weights")
    op = kernels.loglinear_gated_delta_rule
    full = {n: x[n].clone().requires_grad_() for n in names}
    state, outs, states, loss = None, [], [], 0.0
    for rr in range(P):
        s = slice(rr * TL, (rr + 1) * TL)
        o, state = op(*(full[n][:, s] for n in names), initial_state=state, output_final_state=True,
                      position_offset=rr * TL, backend="torch")
        outs.append(o)
        states.append(state)
        loss = loss + (o * do[:, s]).sum() + ((state * w_state[rr]).sum() if want_states else 0.0)
    loss.backward()

    sl = slice(rank * TL, (rank + 1) * TL)
    loc = {n: (x[n][:, sl].to(torch.bfloat16) if n in ("q", "k", "v") else x[n][:, sl]).clone().requires_grad_()
           for n in names}
    trees, forward = [], fused.tree_forward
    fused.tree_forward = lambda *a, **kw: trees.append(1) or transition_tree.tree_forward(*a, **kw)
    try:
        o, s_out = context_parallel(op, dist.group.WORLD)(*(loc[n] for n in names), output_final_state=want_states,
                                                           backend="triton")
    finally:
        fused.tree_forward = forward
    ((o.float() * do[:, sl]).sum() + ((s_out * w_state[rank]).sum() if want_states else 0.0)).backward()
    err = {"ll o": rel(o, outs[rank]), "ll took the tree": 0.0 if len(trees) == 1 else float("inf")}
    if want_states:
        err["ll state"] = rel(s_out, states[rank])
    for n in names:
        err["ll d" + n] = rel(loc[n].grad, full[n].grad[:, sl])
    return err


def _fused_case(rank, kind, device):
    from lctrain.kernels.triton import ops
    previous = ops.set_config(fuse_out=1)
    try:
        return _linear_case(rank, kind, "overlap", device)
    finally:
        ops.set_config(**previous)


def _conv_case(rank, device):
    import torch.distributed as dist
    from lctrain.parallel.halo import prepend_halo
    Bc, Tl, C, ks = CONV
    gen = torch.Generator(device=device).manual_seed(5)
    x_full, dy = (torch.randn(Bc, P * Tl, C, generator=gen, device=device) for _ in range(2))
    w_full = torch.randn(C, ks, generator=gen, device=device)
    xr, wr = x_full.clone().requires_grad_(), w_full.clone().requires_grad_()
    y_ref = F.conv1d(F.pad(xr.transpose(1, 2), (ks - 1, 0)), wr[:, None, :], groups=C).transpose(1, 2)
    (y_ref * dy).sum().backward()
    sl = slice(rank * Tl, (rank + 1) * Tl)
    x = x_full[:, sl].to(torch.bfloat16).clone().requires_grad_()
    w = w_full.to(torch.bfloat16).clone().requires_grad_()
    xh = prepend_halo(x, ks - 1, dist.group.WORLD, dim=1)
    y = F.conv1d(xh.transpose(1, 2), w[:, None, :], groups=C).transpose(1, 2)
    (y.float() * dy[:, sl]).sum().backward()
    dw = w.grad.float()
    dist.all_reduce(dw)
    return {"conv y": rel(y, y_ref[:, sl]), "conv dx": rel(x.grad, xr.grad[:, sl]), "conv dw": rel(dw, wr.grad)}


def _attention_case(rank, window, device):
    """The model's Attention block core: halo path (window) or Ulysses (window None) vs one GPU."""
    import torch.distributed as dist

    from lctrain.models.attention import Attention
    Ha, Da, Tl = ATTN["H"], ATTN["D"], ATTN["TL"]
    gen = torch.Generator(device=device).manual_seed(11 if window else 13)
    q, k, v, do = (torch.randn(1, P * Tl, Ha, Da, generator=gen, device=device) for _ in range(4))
    make = lambda grp: Attention(Ha * Da, Ha, Da, window=window, rope=None, cp_group=grp).to(device)  # noqa: E731
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = make(None)._attend_local(*ref_in)
    (o_ref * do).sum().backward()
    sl = slice(rank * Tl, (rank + 1) * Tl)
    loc = [t[:, sl].to(torch.bfloat16).clone().requires_grad_() for t in (q, k, v)]
    o = make(dist.group.WORLD)._attend_cp(*loc, rank * Tl)
    (o.float() * do[:, sl]).sum().backward()
    tag = "swa" if window else "ulysses"
    err = {f"{tag} o": rel(o, o_ref[:, sl])}
    for n, a, r in zip("qkv", loc, ref_in):
        err[f"{tag} d{n}"] = rel(a.grad, r.grad[:, sl])
    return err


def _model_case(rank, device):
    """One training step (loss + backward, full checkpointing) of a float32 G/D/M model on the Triton backend
    under CP = 2 with the default transition ("auto": pipeline here) against the same model on one GPU: the
    loss and every parameter gradient (summed over the CP ranks, as the trainer does)."""
    import torch.distributed as dist

    from lctrain.config import default_config
    from lctrain.models import build_model
    from lctrain.train.step import lm_loss
    m = default_config().model
    m.vocab_size, m.d_model, m.layer_pattern, m.n_heads, m.head_dim = 256, 128, "GDM", 2, 64
    m.chunk_size, m.kernel_backend, m.activation_checkpointing, m.document_end_id = 64, "triton", "full", None

    def build(group):
        torch.manual_seed(0)
        return build_model(m, cp_group=group).to(device)

    gen = torch.Generator(device=device).manual_seed(3)
    tokens = torch.randint(0, m.vocab_size, (1, P * TL + 1), generator=gen, device=device)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    ref = build(None)
    ref_loss, _ = lm_loss(ref, ids, labels)
    ref_loss.backward()
    model = build(dist.group.WORLD)
    sl = slice(rank * TL, (rank + 1) * TL)
    loss, mean = lm_loss(model, ids[:, sl], labels[:, sl], cp_group=dist.group.WORLD, position_offset=rank * TL)
    loss.backward()
    ops = [op for b in model.blocks if hasattr(b.mixer, "cp_ops") for op in b.mixer.cp_ops()]
    ran = [(op.resolved_transition(m.kernel_backend, device), op.gathers, op.replays_reused) for op in ops]
    err = {"loss": abs(mean.item() - ref_loss.item()) / abs(ref_loss.item()),
           # 0 when every CP op ran pipeline with one all-gather, reused by its checkpoint replay
           "default transition": 0.0 if ran == [("pipeline", 1, 1)] * 3 else float("inf")}
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        g = p.grad.detach().clone()
        dist.all_reduce(g)
        err["d " + name] = rel(g, p_ref.grad)
    return err


def _case_name(key):
    return key if isinstance(key, str) else "/".join(key)


def _selected(key) -> bool:
    """Whether CP_GPU_CASES (empty: every case) names the case, or the first part of its name."""
    return not CASES or _case_name(key) in CASES or _case_name(key).split("/")[0] in CASES


def gpu_worker(rank, world_size):
    import torch.distributed as dist
    device = torch.device("cuda", 0 if ONE_DEVICE else rank)
    torch.cuda.set_device(device)
    if ONE_DEVICE:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=300))
    else:
        dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=300), device_id=device)
    cases = {(kind, transition): functools.partial(_linear_case, rank, kind, transition, device)
             for kind, transition in LINEAR_CASES}
    for kind, transition in UNWEIGHTED_CASES:
        cases[(kind, transition, "unweighted")] = functools.partial(_linear_case, rank, kind, transition, device,
                                                                    weigh_states=False)
    for kind in FUSED_KINDS:
        cases[(kind, "overlap", "fuse_out")] = functools.partial(_fused_case, rank, kind, device)
    cases["conv"] = functools.partial(_conv_case, rank, device)
    cases["loglinear"] = functools.partial(_loglinear_case, rank, device)
    cases[("loglinear", "no_state")] = functools.partial(_loglinear_case, rank, device, want_states=False)
    cases["model"] = functools.partial(_model_case, rank, device)
    cases["swa"] = functools.partial(_attention_case, rank, ATTN["window"], device)
    if HAS_DEEPSPEED:
        cases["ulysses"] = functools.partial(_attention_case, rank, None, device)
    if CASES:
        unknown = set(CASES) - {_case_name(k).split("/")[0] for k in cases} - {_case_name(k) for k in cases}
        if unknown:
            raise ValueError(f"CP_GPU_CASES names no case: {sorted(unknown)}; the cases: "
                             f"{sorted(_case_name(k) for k in cases)}")
        cases = {k: c for k, c in cases.items() if _selected(k)}
    out = {}
    for key, case in cases.items():
        # one failing case (the same on every rank, before or after its collectives) fails its test only
        try:
            out[key] = case()
        except Exception as err:  # noqa: BLE001 - reported by the case's test
            import traceback
            out[key] = {"error": "".join(traceback.format_exception(err))[-3000:]}
    return out


@functools.lru_cache(maxsize=None)
def world():
    return run_world(gpu_worker, P, timeout=900, init_process_group=False)


def _check(key):
    if not _selected(key):
        pytest.skip(f"CP_GPU_CASES={','.join(CASES)} leaves out {_case_name(key)}")
    for rank, res in enumerate(world()):
        assert "error" not in res[key], f"{key} rank {rank} raised:\n{res[key].get('error')}"
        bad = {k: e for k, e in res[key].items() if not e <= TOL}
        assert not bad, f"{key} rank {rank}: relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("kind,transition", LINEAR_CASES)
def test_cp_linear_mixer_on_two_gpus(kind, transition):
    _check((kind, transition))


@pytest.mark.parametrize("kind,transition", UNWEIGHTED_CASES)
def test_cp_linear_mixer_without_final_state_loss_on_two_gpus(kind, transition):
    _check((kind, transition, "unweighted"))


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_cp_overlap_fused_output_on_two_gpus(kind):
    _check((kind, "overlap", "fuse_out"))


def test_cp_model_step_with_the_default_transition_on_two_gpus():
    _check("model")


def test_cp_conv_halo_on_two_gpus():
    _check("conv")


def test_cp_loglinear_transition_tree_on_two_gpus():
    _check("loglinear")


def test_cp_loglinear_transition_tree_without_final_states_on_two_gpus():
    _check(("loglinear", "no_state"))


def test_cp_sliding_window_halo_on_two_gpus():
    _check("swa")


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="Ulysses needs DeepSpeed")
def test_cp_ulysses_on_two_gpus():
    _check("ulysses")
