"""Shared by the Triton kernel tests (CPU interpreter and GPU): call an op by kind, take its outputs and all gradients."""
import torch

from lctrain.kernels import delta_rule, gated_delta_rule, gated_linear_attn


def call(kind, x, backend):
    """Run the `kind` op ("delta", "gated_delta", "gla") on the inputs dict `x` with initial state and final state."""
    kw = dict(initial_state=x["initial_state"], output_final_state=True, backend=backend)
    if kind == "delta":
        return delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
    if kind == "gated_delta":
        return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    return gated_linear_attn(x["q"], x["k"], x["v"], x["g"], **kw)


def outputs_and_grads(kind, x, backend, do, dS):
    """(o, final_state, {input name: gradient}) for the loss sum(o * do) + sum(final_state * dS)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if t is not None}
    o, S = call(kind, leaves, backend)
    loss = (o.float() * do).sum() + (S * dS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), S.detach(), dict(zip(leaves, grads))
