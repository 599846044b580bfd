"""Models: layers, RoPE scalings, attention masks, HybridLM forward/backward, checkpointing,
incremental decoding and context parallelism on 2 gloo processes.

Tiny float32 shapes on CPU, backends "torch" and "naive".
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import default_config
from lctrain.models import (
    Attention,
    DeltaNetMixer,
    HybridLM,
    Mamba2Mixer,
    RotaryEmbedding,
    ShortConv,
    build_model,
    rope_inv_freq,
)
from lctrain.models.attention import masked_attention

BACKENDS = ["torch", "naive"]


def tiny_cfg(pattern="GSGA", backend="torch", **over):
    cfg = default_config().model
    cfg.vocab_size = 64
    cfg.d_model = 32
    cfg.n_heads = 2
    cfg.head_dim = 8
    cfg.attn_heads = 2
    cfg.attn_head_dim = 8
    cfg.window = 5
    cfg.conv_size = 3
    cfg.mlp_ratio = 2.0
    cfg.chunk_size = 8
    cfg.kernel_backend = backend
    cfg.layer_pattern = pattern
    # the tiny default model's retrieval aids are off unless a test asks for them
    cfg.rope.layers = "all"
    cfg.attn_conv_size = 0
    cfg.document_end_id = None
    for key, value in over.items():
        if key.startswith("rope_"):
            setattr(cfg.rope, key[5:], value)
        else:
            setattr(cfg, key, value)
    return cfg


def _rope(head_dim=8, **kw):
    return RotaryEmbedding(head_dim, **kw)


# ----------------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gated_delta", "delta", "mamba2", "sliding", "global"])
def test_mixer_forward_backward_shapes_and_finite(kind, backend):
    torch.manual_seed(0)
    d, B, T = 24, 2, 13
    if kind in ("gated_delta", "delta"):
        layer = DeltaNetMixer(d, n_heads=2, head_dim=6, conv_size=4, gated=kind == "gated_delta",
                              backend=backend, chunk_size=4)
    elif kind == "mamba2":
        layer = Mamba2Mixer(d, n_heads=3, head_dim=4, conv_size=4, backend=backend, chunk_size=4)
    else:
        layer = Attention(d, 2, 6, window=4 if kind == "sliding" else None, rope=_rope(6))
    x = torch.randn(B, T, d, requires_grad=True)
    y = layer(x)
    assert y.shape == (B, T, d)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_mixers_are_causal():
    torch.manual_seed(1)
    d, T = 16, 12
    layers = [DeltaNetMixer(d, n_heads=2, head_dim=4, conv_size=3, gated=True, backend="torch", chunk_size=4),
              DeltaNetMixer(d, n_heads=2, head_dim=4, conv_size=3, gated=False, backend="torch", chunk_size=4),
              Mamba2Mixer(d, n_heads=2, head_dim=4, conv_size=3, backend="torch", chunk_size=4),
              Attention(d, 2, 4, window=3, rope=_rope(4)), Attention(d, 2, 4, window=None, rope=_rope(4))]
    x = torch.randn(1, T, d)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, T - 7, d)
    for layer in layers:
        y, y2 = layer(x), layer(x2)
        torch.testing.assert_close(y[:, :7], y2[:, :7])
        assert not torch.allclose(y[:, 7:], y2[:, 7:])


def _gate_fed_to_op(layer, x):
    """The log-decay g that `layer` hands its kernel op for input x (captured at the op call)."""
    seen = {}

    def capture(args, cache, scale=None, docs=None, **_):  # x, position_offset: for the log-linear mixers
        seen["g"] = args[3]  # (q, k, v, g, ...) for both gated mixers
        return torch.zeros_like(args[2])

    layer._run_op = capture
    with torch.no_grad():
        layer(x)
    return seen["g"]


@pytest.mark.parametrize("kind", ["gated_delta", "mamba2"])
def test_gate_is_a_log_decay_in_range(kind):
    """g < 0 and finite for large inputs; at zero input the decay per token is Mamba-2's init range
    A * dt with A in [1, 16], dt in [1e-3, 0.1], i.e. -g in [1e-3, 1.6]."""
    torch.manual_seed(2)
    if kind == "gated_delta":
        layer = DeltaNetMixer(16, n_heads=4, head_dim=4, conv_size=2, gated=True, backend="torch")
    else:
        layer = Mamba2Mixer(16, n_heads=4, head_dim=4, conv_size=2, backend="torch")
    g = _gate_fed_to_op(layer, torch.randn(3, 9, 16) * 5)
    assert g.shape == (3, 9, 4) and g.dtype == torch.float32
    assert (g < 0).all() and torch.isfinite(g).all()
    g0 = _gate_fed_to_op(layer, torch.zeros(1, 2, 16))
    assert ((-g0 >= 1e-3 * (1 - 1e-5)) & (-g0 <= 1.6 * (1 + 1e-5))).all(), g0
    assert len(set(g0[0, 0].tolist())) == 4, "each head draws its own A and dt"


def test_short_conv_matches_brute_force_and_prefix_chains():
    torch.manual_seed(3)
    conv = ShortConv(5, 4, activation=False)
    x = torch.randn(2, 11, 5)
    y, tail = conv(x)
    w = conv.weight[:, 0, :]  # [C, K]; output t = sum_j w[:, j] * x[t - (K-1) + j]
    xp = torch.cat([torch.zeros(2, 3, 5), x], dim=1)
    want = torch.stack([(xp[:, t:t + 4] * w.T[None]).sum(1) for t in range(11)], dim=1)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(tail, x[:, -3:])
    y1, t1 = conv(x[:, :6])
    y2, _ = conv(x[:, 6:], t1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


# ----------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn"])
def test_rope_scalings_reduce_to_plain_at_factor_one(scaling):
    plain, m0 = rope_inv_freq(16, 10000.0)
    theta, m = rope_inv_freq(16, 10000.0, scaling, 1.0, original_max_position=64)
    torch.testing.assert_close(theta, plain)
    assert m == m0 == 1.0


def test_rope_linear_and_ntk_frequencies():
    d, base, s = 16, 10000.0, 4.0
    plain, _ = rope_inv_freq(d, base)
    torch.testing.assert_close(plain, base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    linear, _ = rope_inv_freq(d, base, "linear", s)
    torch.testing.assert_close(linear, plain / s)
    ntk, _ = rope_inv_freq(d, base, "ntk", s)
    torch.testing.assert_close(ntk[0], plain[0])  # highest frequency untouched
    torch.testing.assert_close(ntk[-1], plain[-1] / s)  # lowest frequency interpolated by s
    assert (ntk[1:] < plain[1:]).all()


def test_rope_yarn_ramp_and_temperature():
    d, base, s, L = 64, 10000.0, 8.0, 256
    plain, _ = rope_inv_freq(d, base)
    yarn, mscale = rope_inv_freq(d, base, "yarn", s, original_max_position=L)
    turns = L * plain / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(yarn[fast], plain[fast])
    torch.testing.assert_close(yarn[slow], plain[slow] / s)
    mid = ~fast & ~slow
    assert ((yarn[mid] < plain[mid]) & (yarn[mid] > plain[mid] / s)).all()
    assert mscale == pytest.approx(0.1 * math.log(s) + 1)
    with pytest.raises(ValueError, match="original_max_position"):
        rope_inv_freq(d, base, "yarn", s, original_max_position=0)


def test_rope_rotates_pairs_by_position_times_frequency():
    torch.manual_seed(4)
    rope = _rope(8, base=100.0)
    x = torch.randn(1, 3, 2, 8)
    pos = torch.tensor([0, 5, 1000])
    y = rope(x, pos)
    theta = rope_inv_freq(8, 100.0)[0].float()
    zx = torch.complex(x[..., :4], x[..., 4:])
    zy = zx * torch.polar(torch.ones(3, 4), pos[:, None].float() * theta)[None, :, None, :]
    torch.testing.assert_close(y, torch.cat([zy.real, zy.imag], -1), atol=1e-4, rtol=1e-4)


def test_model_passes_max_position_to_yarn():
    cfg = tiny_cfg("A", rope_scaling="yarn", rope_factor=4.0)
    with pytest.raises(ValueError, match="original_max_position"):
        HybridLM(cfg)
    model = HybridLM(cfg, max_position=64)
    assert model.blocks[0].mixer.rope.mscale == pytest.approx(0.1 * math.log(4.0) + 1)


# ----------------------------------------------------------------------------------------- attention

def _brute_attention(q, k, v, window):
    B, T, H, D = q.shape
    out = torch.zeros_like(q)
    for i in range(T):
        lo = 0 if window is None else max(0, i - window + 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo:i + 1]) / math.sqrt(D)
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), v[:, lo:i + 1])
    return out


@pytest.mark.parametrize("window", [1, 3, 6, None])
def test_attention_equals_brute_force(window):
    torch.manual_seed(5)
    layer = Attention(16, 2, 8, window=window, rope=_rope(8))
    x = torch.randn(2, 11, 16)
    B, T, _ = x.shape
    pos = torch.arange(T)
    q = layer.rope(layer.q_proj(x).view(B, T, 2, 8), pos)
    k = layer.rope(layer.k_proj(x).view(B, T, 2, 8), pos)
    v = layer.v_proj(x).view(B, T, 2, 8)
    want = layer.o_proj(_brute_attention(q, k, v, window).reshape(B, T, 16))
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_masked_attention_ignores_negative_positions():
    """What CP rank 0 sees: halo keys at negative positions (zeros) must not be attended."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))
    halo_k, halo_v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    out = masked_attention(q, torch.cat([halo_k, k], 1), torch.cat([halo_v, v], 1),
                           torch.arange(5), torch.arange(-2, 5), window=3)
    torch.testing.assert_close(out, _brute_attention(q, k, v, 3))


@pytest.mark.parametrize("window", [4, None])
def test_attention_invariant_to_common_position_offset(window):
    torch.manual_seed(7)
    layer = Attention(16, 2, 8, window=window, rope=_rope(8))
    x = torch.randn(1, 9, 16)
    y0 = layer(x, position_offset=0)
    torch.testing.assert_close(layer(x, position_offset=37), y0, atol=1e-4, rtol=1e-4)
    # but a query/key shift does change positions: rope itself depends on the offset
    pos = torch.arange(9)
    xr = torch.randn(1, 9, 2, 8)
    assert not torch.allclose(layer.rope(xr, pos), layer.rope(xr, pos + 37))


# ----------------------------------------------------------------------------------------- HybridLM

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["GSGA", "DMGA", ["G", "S", "M", "A", "D"]])
def test_hybrid_forward_backward(pattern, backend):
    torch.manual_seed(8)
    model = build_model(tiny_cfg(pattern, backend))
    assert len(model.blocks) == len(pattern)
    assert [b.kind for b in model.blocks] == list(pattern)
    ids = torch.randint(0, 64, (2, 19))
    logits = model(ids)
    assert logits.shape == (2, 19, 64) and logits.dtype == torch.float32
    loss = F.cross_entropy(logits.reshape(-1, 64), torch.randint(0, 64, (2 * 19,)))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_tied_and_untied_heads():
    torch.manual_seed(9)
    tied = build_model(tiny_cfg("GA", tie_embeddings=True))
    untied = build_model(tiny_cfg("GA", tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 64 * 32
    ids = torch.randint(0, 64, (1, 7))
    tied(ids).sum().backward()
    assert tied.embed.weight.grad is not None


def test_init_scales_output_projections():
    torch.manual_seed(10)
    model = build_model(tiny_cfg("GSGAGSGA", init_std=0.05, d_model=256, n_heads=4, head_dim=64))
    block = model.blocks[0]
    assert block.mixer.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(16), rel=0.05)
    assert block.mixer.o_proj.weight.std().item() == pytest.approx(0.05 / math.sqrt(16), rel=0.05)


def test_activation_checkpointing_gives_identical_loss_and_grads():
    torch.manual_seed(11)
    plain = build_model(tiny_cfg("GSMA"))
    ckpt_cfg = tiny_cfg("GSMA", activation_checkpointing="full")
    ckpt = build_model(ckpt_cfg)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.checkpointed == "AGMS" and plain.checkpointed == ""
    ids = torch.randint(0, 64, (2, 17))
    labels = torch.randint(0, 64, (2, 17))
    losses = []
    for model in (plain, ckpt):
        loss = F.cross_entropy(model(ids, position_offset=3).reshape(-1, 64), labels.reshape(-1))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointed_loglinear_blocks_keep_their_level_states(monkeypatch):
    """Activation-checkpointed log-linear blocks (L, K) run their op under KEEP_H=1, in the forward and in
    the recomputation before their backward (the Triton kernels then keep the level states for the
    backward instead of scanning again); blocks that are not checkpointed, and the settings after the
    step, keep the default (0). Loss and gradients equal the plain model's."""
    import lctrain.kernels as kernels
    from lctrain.kernels.loglinear import triton_levels
    seen = []
    for name in ("loglinear_gated_delta_rule", "loglinear_gated_linear_attn"):
        op = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _op=op, _n=name, **kw:
                            seen.append((_n[10:], triton_levels.CONFIG["KEEP_H"])) or _op(*a, **kw))
    torch.manual_seed(12)
    plain = build_model(tiny_cfg("LSKA"))
    ckpt = build_model(tiny_cfg("LSKA", activation_checkpointing="full"))
    ckpt.load_state_dict(plain.state_dict())
    ids, labels = torch.randint(0, 64, (1, 19)), torch.randint(0, 64, (1, 19))
    losses, runs = [], []
    for model in (plain, ckpt):
        seen.clear()
        loss = F.cross_entropy(model(ids).reshape(-1, 64), labels.reshape(-1))
        loss.backward()
        losses.append(loss)
        runs.append(list(seen))
    assert runs[0] == [("gated_delta_rule", 0), ("gated_linear_attn", 0)]
    assert runs[1] == [("gated_delta_rule", 1), ("gated_linear_attn", 1),      # the forward
                       ("gated_linear_attn", 1), ("gated_delta_rule", 1)]      # recomputed, last block first
    assert triton_levels.CONFIG["KEEP_H"] == 0
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,rope_layers,attn_conv",
                         [("GSDMA", "all", 0), ("SAMG", "all", 0), ("SAMG", "sliding", 0),
                                                           ("SAMG", "sliding", 3)])
def test_incremental_decoding_matches_full_forward(pattern, rope_layers, attn_conv, backend):
    torch.manual_seed(12)
    model = build_model(tiny_cfg(pattern, backend, rope_layers=rope_layers, attn_conv_size=attn_conv,
                                 attn_conv_layers="all")).eval()
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, ids.device)
        parts = [model(ids[:, :9], cache=cache), model(ids[:, 9:14], cache=cache)]  # two prefills
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(14, 23)]
    assert cache.seen_tokens == 23
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)
    # the sliding-window KV cache keeps only window-1 positions
    for block, layer_cache in zip(model.blocks, cache.layers):
        if block.kind == "S":
            assert layer_cache["k"].shape[1] == model.cfg.window - 1


def test_position_offset_reaches_attention_rope():
    torch.manual_seed(13)
    model = build_model(tiny_cfg("A")).eval()
    ids = torch.randint(0, 64, (1, 8))
    # a single global-attention block with plain RoPE depends only on relative positions
    torch.testing.assert_close(model(ids, position_offset=100), model(ids), atol=1e-4, rtol=1e-4)
    yarn = build_model(tiny_cfg("A", rope_scaling="yarn", rope_factor=4.0, rope_original_max_position=16)).eval()
    assert not torch.allclose(yarn(ids), model(ids))


def test_rope_layers_sliding_leaves_global_attention_without_positions():
    """rope.layers=sliding: a global-attention layer sees its keys as a set (content only), so the
    last position's output ignores the order of the earlier tokens; with RoPE it does not."""
    torch.manual_seed(16)
    ids = torch.randint(0, 64, (1, 9))
    shuffled = torch.cat([ids[:, :8][:, torch.randperm(8)], ids[:, 8:]], 1)
    nope = build_model(tiny_cfg("A", rope_layers="sliding")).eval()
    assert nope.blocks[0].mixer.rope is None
    with torch.no_grad():
        torch.testing.assert_close(nope(shuffled)[:, -1], nope(ids)[:, -1], atol=1e-5, rtol=1e-5)
        roped = build_model(tiny_cfg("A")).eval()
        roped.load_state_dict(nope.state_dict())
        assert not torch.allclose(roped(shuffled)[:, -1], roped(ids)[:, -1], atol=1e-3)
    # sliding-window layers keep their rotation
    assert build_model(tiny_cfg("SA", rope_layers="sliding")).blocks[0].mixer.rope is not None


def test_attention_conv_reaches_the_layers_config_names():
    """attn_conv_size on every attention layer (all) or only the global ones (global); a key then
    depends on the tokens before it, which without the conv it does not."""
    both = build_model(tiny_cfg("SA", attn_conv_size=3, attn_conv_layers="all"))
    only_global = build_model(tiny_cfg("SA", attn_conv_size=3, attn_conv_layers="global"))
    assert [b.mixer.conv_size for b in both.blocks] == [3, 3]
    assert [b.mixer.conv_size for b in only_global.blocks] == [0, 3]
    torch.manual_seed(17)
    x = torch.randn(1, 6, 32)
    layer = only_global.blocks[1].mixer
    k = layer._project(layer.k_proj, "k_conv", x, None)
    x2 = x.clone()
    x2[:, 2] += 1.0
    k2 = layer._project(layer.k_proj, "k_conv", x2, None)
    assert torch.equal(k[:, :2], k2[:, :2]) and not torch.allclose(k[:, 3], k2[:, 3])  # causal, and sees back


@pytest.mark.parametrize("pattern", ["SA", "A"])
def test_document_mask_keeps_packed_documents_apart(pattern):
    """With model.document_end_id, a document packed after another gives the same logits as alone
    (attention-only patterns: the recurrent layers and short convs do carry context across)."""
    torch.manual_seed(18)
    model = build_model(tiny_cfg(pattern, document_end_id=63)).eval()
    first, second = torch.randint(0, 63, (2, 7)), torch.randint(0, 63, (2, 9))
    sep = torch.full((2, 1), 63)
    with torch.no_grad():
        packed = model(torch.cat([first, sep, second], 1))
        torch.testing.assert_close(packed[:, :8], model(torch.cat([first, sep], 1)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 8:], model(second), atol=1e-5, rtol=1e-5)
        unmasked = build_model(tiny_cfg(pattern)).eval()
        unmasked.load_state_dict(model.state_dict())
        assert not torch.allclose(unmasked(torch.cat([first, sep, second], 1))[:, 8:], model(second), atol=1e-3)
    # decoding: one document per prompt
    with pytest.raises(ValueError, match="one document per prompt"):
        model(torch.cat([first, sep, second], 1), cache=model.new_cache(2))


@pytest.mark.parametrize("window,halo", [(None, 0), (5, 0), (5, 4), (40, 0)])
def test_windowed_attention_equals_the_dense_mask(window, halo):
    """The CPU path (query blocks over the keys in reach, no Tq x Tk mask) equals SDPA with the dense
    mask, across several blocks, with a halo whose first keys sit at negative positions, and with
    documents."""
    from lctrain.models.attention import windowed_attention

    torch.manual_seed(21)
    B, T, H, D = 2, 37, 2, 8
    q = torch.randn(B, T, H, D)
    k, v = (torch.randn(B, T + halo, H, D) for _ in range(2))
    q_pos, k_pos = torch.arange(T), torch.arange(-halo, T)
    torch.testing.assert_close(windowed_attention(q, k, v, 0, -halo, window, block=8),
                               masked_attention(q, k, v, q_pos, k_pos, window))
    k_docs = (k_pos[None] >= torch.tensor([[9], [20]])).long()  # one boundary per row
    q_docs = k_docs[:, halo:]
    mask = ((k_pos[None, None] <= q_pos[None, :, None]) & (k_pos[None, None] >= 0)
            & (q_docs[:, :, None] == k_docs[:, None]))
    if window is not None:
        mask &= k_pos[None, None] > q_pos[None, :, None] - window
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask[:, None]).transpose(1, 2)
    torch.testing.assert_close(windowed_attention(q, k, v, 0, -halo, window, q_docs, k_docs, block=8), want)


def _packed_vs_alone(model, lengths, batch=1, seed=0):
    """Logits of documents packed into rows (each ending in token 63) vs each document alone."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(0, 63, (batch, n - 1), generator=gen), torch.full((batch, 1), 63)], 1)
            for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(docs, 1))
        start = 0
        for doc in docs:
            alone = model(doc)
            torch.testing.assert_close(packed[:, start:start + doc.shape[1]], alone, atol=2e-5, rtol=2e-5)
            start += doc.shape[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_are_apart_in_every_layer(backend):
    """model.document_end_id: recurrent states, short convs (mixers' and attention's) and attention
    all restart at each document; documents shorter than a chunk / the conv / the window, of one token;
    two rows with the same layout go end to end as one packed stream."""
    torch.manual_seed(19)
    model = build_model(tiny_cfg("GDMSA", backend, document_end_id=63, attn_conv_size=3,
                                 attn_conv_layers="all")).eval()
    _packed_vs_alone(model, [6, 1, 2, 11, 9], batch=2)


@pytest.mark.slow
def test_packed_documents_apart_above_the_old_16k_cap():
    """Every layer letter at 16.5K packed tokens (no T x T mask anywhere), CPU-sized model."""
    torch.manual_seed(20)
    model = build_model(tiny_cfg("GDMSA", "torch", document_end_id=63, chunk_size=64, window=64,
                                 attn_conv_size=3, attn_conv_layers="all")).eval()
    _packed_vs_alone(model, [9000, 1, 30, 7469])


def test_document_end_id_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="model.document_end_id=64 is not a token id"):
        build_model(tiny_cfg("GA", document_end_id=64))


def test_bad_pattern_names_the_key():
    with pytest.raises(ValueError, match="layer_pattern"):
        build_model(tiny_cfg("GXA"))
    with pytest.raises(ValueError, match="layer_pattern"):
        build_model(tiny_cfg(""))


# ----------------------------------------------------------------------------------------- context parallel

def _cp_errors(rank, world, pattern, separators=(), **over):
    """(max |logits error|, max relative gradient error) of the CP model on this rank vs one process.
    `separators`: positions that hold token 63 (the document end when document_end_id=63). In float64:
    some gradients are near-zero cancelling sums (a Mamba-2 D: norm 1.4e-3 from terms of order 1), whose
    float32 relative error (1.2e-3 on one CPU, below 1e-3 on another) measures rounding, not CP."""
    import torch.distributed as dist

    torch.manual_seed(14)
    torch.set_default_dtype(torch.float64)  # this worker process only
    cfg = tiny_cfg(pattern, "torch", window=4, chunk_size=4, **over)
    full_model = build_model(cfg)
    cp_model = build_model(cfg, cp_group=dist.group.WORLD)
    cp_model.load_state_dict(full_model.state_dict())
    T = 16
    ids = torch.randint(0, 63, (2, T))
    ids[:, list(separators)] = 63
    weights = torch.randn(2, T, 64)
    full = full_model(ids)
    (full * weights).sum().backward()
    Tl = T // world
    local = cp_model(ids[:, rank * Tl:(rank + 1) * Tl], position_offset=rank * Tl)
    (local * weights[:, rank * Tl:(rank + 1) * Tl]).sum().backward()
    grads = []
    for p in cp_model.parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads.append(g)
    out = (local - full[:, rank * Tl:(rank + 1) * Tl]).abs().max().item()
    grad_err = max(((g - p.grad).norm() / (p.grad.norm() + 1e-12)).item()
                   for g, p in zip(grads, full_model.parameters()))
    return out, grad_err


def _cp_worker(rank, world):
    return [_cp_errors(rank, world, "GSMA"), _cp_errors(rank, world, "DSA", activation_checkpointing="full"),
            _cp_errors(rank, world, "SGA", rope_layers="sliding"),
            # the default model's retrieval settings: q/k/v convs (halo), documents across the shard edge
            _cp_errors(rank, world, "SAGA", separators=(3, 7, 9), rope_layers="sliding", attn_conv_size=3,
                       attn_conv_layers="all", document_end_id=63),
            # every layer letter with packed documents: one crosses the shard edge, one of a single
            # token; recurrent states, convs and attention restart in every layer
            _cp_errors(rank, world, "GDMSA", separators=(2, 3, 9, 12), attn_conv_size=3, attn_conv_layers="all",
                       document_end_id=63, activation_checkpointing="full")]


def test_context_parallel_matches_one_process():
    """Patterns GSMA, DSA (with activation checkpointing), SGA with a NoPE global layer, SAGA with
    attention convs and packed documents (document masking), and GDMSA with packed documents in every
    layer (checkpointed) on 2 gloo ranks, in float64: each rank's
    logits equal the one-process logits of its shard; summed gradients equal the one-process ones."""
    from dist_utils import run_world

    for per_rank in run_world(_cp_worker, 2, timeout=240):
        for out_err, grad_err in per_rank:
            assert out_err < 1e-9, per_rank
            assert grad_err < 1e-6, per_rank


# ----------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 512])
def test_flex_sliding_window_matches_masked_attention_on_cuda(offset):
    """The FlexAttention path (CUDA) equals the masked SDPA path, incl. a CP halo whose keys at
    negative positions (CP rank 0) must be masked out."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lctrain.models.attention import _flex_sliding_window

    torch.manual_seed(15)
    B, T, H, D, W = 2, 512, 4, 64, 64
    q, k, v = (torch.randn(B, T + (W - 1 if i else 0), H, D, device="cuda") for i in range(3))
    q_pos = torch.arange(offset, offset + T, device="cuda")
    k_pos = torch.arange(offset - (W - 1), offset + T, device="cuda")
    want = masked_attention(q, k, v, q_pos, k_pos, W)
    got = _flex_sliding_window(q, k, v, W, halo=W - 1, first_valid=max(0, W - 1 - offset))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("window,halo", [(None, 0), (64, 0), (64, 63)])
def test_flex_document_mask_matches_the_exact_path_on_cuda(window, halo):
    """FlexAttention with a document block mask (global, sliding, sliding with a CP halo) equals the
    exact per-block SDPA path; documents of one token and crossing block edges."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lctrain.models.attention import _flex_sliding_window, windowed_attention

    torch.manual_seed(16)
    B, T, H, D = 2, 700, 4, 64
    q = torch.randn(B, T, H, D, device="cuda")
    k, v = (torch.randn(B, T + halo, H, D, device="cuda") for _ in range(2))
    cuts = torch.tensor([0, 1, 130, 131, 400, 10_000], device="cuda")
    pos = torch.arange(-halo, T, device="cuda")
    k_docs = (torch.searchsorted(cuts, pos, right=True) - 1).expand(B, -1).contiguous()
    q_docs = k_docs[:, halo:].contiguous()
    want = windowed_attention(q, k, v, 0, -halo, window, q_docs, k_docs)
    got = _flex_sliding_window(q, k, v, window, halo=halo, first_valid=halo, q_docs=q_docs, k_docs=k_docs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_default_init_is_width_scaled():
    """model.init_std null: N(0, sqrt(2 / (5 d_model))) for embeddings and projections."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("GA", init_std=None, d_model=256, n_heads=4, head_dim=64))
    std = model.embed.weight.std().item()
    assert abs(std - (2 / (5 * 256)) ** 0.5) < 0.003, std
