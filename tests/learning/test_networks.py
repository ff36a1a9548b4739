import math
from functools import partial

import pytest
import torch
from torch import nn

from scoresde.learning.networks import EMA, MLP, SinusoidalEmbedding, UNet, edm_decay, power_decay


def test_embedding_values(gen):
    emb = SinusoidalEmbedding(8, min_freq=1.0, max_freq=1000.0)
    c = torch.rand(5, generator=gen)
    out = emb(c)
    freqs = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    torch.testing.assert_close(out, torch.cat([torch.sin(c[:, None] * freqs), torch.cos(c[:, None] * freqs)], 1),
                               rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="dim must be even"):
        SinusoidalEmbedding(7)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        emb(torch.zeros(3, 1))


def test_mlp_shapes_zero_init_and_time_dependence(gen):
    torch.manual_seed(0)
    net = MLP(3, hidden=32, depth=2, emb_dim=16)
    x, c = torch.randn(10, 3, generator=gen), torch.rand(10, generator=gen)
    assert torch.equal(net(x, c), torch.zeros(10, 3))  # zero-initialised output layer
    torch.nn.init.normal_(net.out.weight, generator=gen)
    y = net(x, c)
    assert y.shape == (10, 3)
    assert not torch.allclose(net(x, c + 0.3), y)  # the conditioning enters
    assert torch.allclose(net(x[:4], c[:4]), y[:4], atol=1e-6)  # per-sample: no mixing across the batch
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        net(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        MLP(2, hidden=0)


@pytest.mark.parametrize("attention", [False, True])
def test_unet_shapes_and_per_sample(attention, gen):
    torch.manual_seed(0)
    net = UNet(channels=1, base=8, mults=(1, 2), attention=attention)
    for p in net.parameters():  # undo the zero init so the outputs carry information
        torch.nn.init.normal_(p, std=0.2, generator=gen)
    for hw in (8, 16):
        x, c = torch.randn(3, 1, hw, hw, generator=gen), torch.rand(3, generator=gen)
        y = net(x, c)
        assert y.shape == x.shape
        torch.testing.assert_close(net(x[:1], c[:1]), y[:1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(net(x, c + 0.5), y)
    rgb = UNet(channels=3, base=8, mults=(1, 2, 2))
    assert rgb(torch.randn(2, 3, 8, 12), torch.rand(2)).shape == (2, 3, 8, 12)
    with pytest.raises(ValueError, match="multiples of 4"):
        rgb(torch.randn(2, 3, 6, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3, H, W\)"):
        rgb(torch.randn(2, 1, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="mults"):
        UNet(mults=())


def test_unet_zero_init_makes_every_residual_block_the_identity(gen):
    """zero_init (the default): a fresh U-Net outputs 0 and each residual block returns its skip path; false:
    PyTorch's default initialisation, the same parameters, a non-zero output; anything else is refused by name."""
    from scoresde.learning.networks import ResBlock

    x, c = torch.randn(2, 1, 8, 8, generator=gen), torch.rand(2, generator=gen)
    zero, plain = UNet(channels=1, base=8, mults=(1, 2)), UNet(channels=1, base=8, mults=(1, 2), zero_init=False)
    assert torch.equal(zero(x, c), torch.zeros_like(x)) and plain(x, c).abs().min() > 0
    assert [p.shape for p in zero.parameters()] == [p.shape for p in plain.parameters()]
    block, h = zero.down[0], torch.randn(2, 8, 8, 8, generator=gen)
    assert isinstance(block, ResBlock) and torch.equal(block(h, torch.randn(2, 32, generator=gen)), block.skip(h))
    with pytest.raises(ValueError, match="zero_init must be true or false"):
        UNet(zero_init="no")


def test_unet_equals_diffusers_unet2dmodel_given_its_weights_and_embedding(gen):
    """The layout is diffusers' UNet2DModel's (no attention, GroupNorm groups as ours): with its weights copied in
    and its embedding (base sinusoids of the integer timestep, frequencies 10^(-4 i / (base / 2)), i.e. emb_freqs
    scaled by 1000 on t = timestep / 1000) the two networks are one function; bad emb_freqs are refused by name."""
    diffusers = pytest.importorskip("diffusers")
    from scoresde.learning.networks import ResBlock

    base, half = 16, 8
    peer = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(base, 2 * base),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, add_attention=False, norm_num_groups=8).double()
    ours = UNet(1, base=base, mults=(1, 2), emb_dim=base, emb_freqs=(1000 * 1e4 ** (-(half - 1) / half), 1000.0),
                zero_init=False).double()

    def peer_blocks():
        for b in peer.down_blocks:
            yield from [*b.resnets, *(b.downsamplers or [])]
        yield from peer.mid_block.resnets
        for b in peer.up_blocks:
            yield from [*b.resnets, *(b.upsamplers or [])]

    pairs = [(ours.embed[1], peer.time_embedding.linear_1), (ours.embed[3], peer.time_embedding.linear_2),
             (ours.inp, peer.conv_in), (ours.out[0], peer.conv_norm_out), (ours.out[2], peer.conv_out)]
    for o, m in zip([*ours.down, ours.mid1, ours.mid2, *ours.up], peer_blocks(), strict=True):
        if isinstance(o, ResBlock):
            pairs += [(o.norm1, m.norm1), (o.conv1, m.conv1), (o.emb, m.time_emb_proj), (o.norm2, m.norm2),
                      (o.conv2, m.conv2)] + ([(o.skip, m.conv_shortcut)] if m.conv_shortcut is not None else [])
        else:
            pairs.append((o if isinstance(o, nn.Conv2d) else o[1], m.conv))
    with torch.no_grad():
        for o, m in pairs:
            for a, b in zip(o.parameters(), m.parameters(), strict=True):
                a.copy_(b)
        # the peer's features are [cos, sin] at decreasing frequencies, ours [sin, cos] at increasing ones
        ours.embed[1].weight.copy_(peer.time_embedding.linear_1.weight.flip(1))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    x, ts = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64), torch.tensor([0, 417, 999])
    ref = peer(x, ts).sample
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours(x, ts.double() / 1000), ref, rtol=0, atol=1e-5)  # the peer's sinusoids are fp32
    for bad in ((1.0,), (5.0, 1.0), (0.0, 1.0), ("a", 2.0), (1.0, math.inf), 5.0, "1, 2"):
        with pytest.raises(ValueError, match="emb_freqs must be two finite numbers"):
            UNet(emb_freqs=bad)


def test_unet_attention_is_permutation_equivariant_over_positions(gen):
    """Self-attention (without convolutions) mixes positions only through softmax weights."""
    from scoresde.learning.networks import Attention

    attn = Attention(8, groups=4)
    torch.nn.init.normal_(attn.proj.weight, generator=gen)
    x = torch.randn(2, 8, 4, 4, generator=gen)
    perm = torch.randperm(16, generator=gen)
    y = attn(x).flatten(2)[:, :, perm]
    y_perm = attn(x.flatten(2)[:, :, perm].reshape(2, 8, 4, 4)).flatten(2)
    torch.testing.assert_close(y, y_perm, rtol=1e-5, atol=1e-5)


def test_unet_attention_levels_at_28_px(gen):
    """Levels 1 and 2 of a 3-level U-Net on 28 px images work at 14x14 and 7x7; one attention block after
    each residual block there (2 down + 3 up per level at num_res=2), none elsewhere."""
    from scoresde.learning.networks import Attention

    net = UNet(channels=1, base=8, mults=(1, 2, 2), num_res=2, attention_levels=(1, 2))
    seen = []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[2:])))
    x = torch.randn(2, 1, 28, 28, generator=gen)
    assert net(x, torch.rand(2, generator=gen)).shape == x.shape
    assert sorted(seen) == sorted([(14, 14)] * 5 + [(7, 7)] * 5)
    plain = UNet(channels=1, base=8, mults=(1, 2, 2), num_res=2, attention=True)
    assert not any("attn" in k for k in plain.state_dict() if not k.startswith("attn."))  # layout of older runs
    for bad in ((3,), (1, 1), (-1,), (True,), ("16",)):
        with pytest.raises(ValueError, match=r"attention_levels must be distinct level indices in 0\.\.2"):
            UNet(mults=(1, 2, 2), attention_levels=bad)


@pytest.mark.parametrize("px, mults, levels, sizes", [(32, (1, 2, 2), (1, 2), {16, 8}),
                                                       (64, (1, 2, 2, 4), (2, 3), {16, 8})])
def test_unet_at_32_and_64_px(px, mults, levels, sizes, gen):
    """The layouts of configs/unet32.yaml and unet64.yaml (narrower): attention where the config says."""
    from scoresde.learning.networks import Attention

    net = UNet(channels=3, base=8, mults=mults, attention_levels=levels)
    seen = set()
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: seen.add(inp[0].shape[2]))
    x = torch.randn(2, 3, px, px, generator=gen)
    assert net(x, torch.rand(2, generator=gen)).shape == x.shape and seen == sizes


def test_ema_matches_closed_form_and_round_trips(gen):
    net = MLP(2, hidden=8, depth=1, emb_dim=4)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    ema = EMA(net, decay=0.9)
    ws = []
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ws.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update()
    # shadow = 0.9^5 w0 + sum_i 0.1 * 0.9^(4 - i) w_i
    for k in w0:
        expect = 0.9**5 * w0[k] + sum(0.1 * 0.9 ** (4 - i) * ws[i][k] for i in range(5))
        torch.testing.assert_close(ema.shadow[k], expect, rtol=1e-5, atol=1e-5)
    current = {k: v.clone() for k, v in net.state_dict().items()}
    x, c = torch.randn(4, 2, generator=gen), torch.rand(4, generator=gen)
    with ema.average_parameters() as m:
        y_ema = m(x, c)
        assert all(torch.equal(v, ema.shadow[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, current[k]) for k, v in net.state_dict().items())  # restored exactly
    frozen = ema.copy()
    assert torch.equal(frozen(x, c), y_ema) and not any(p.requires_grad for p in frozen.parameters())
    other = EMA(MLP(2, hidden=8, depth=1, emb_dim=4), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(net, decay=1.0)


def _history(net, ema, n, gen):
    """Set the weights to n independent random draws, an EMA update after each; the draws (float64)."""
    ws = []
    for _ in range(n):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        ws.append({k: v.double() for k, v in net.state_dict().items()})
        ema.update()
    return ws


@pytest.mark.parametrize("gamma, weight", [
    (1, lambda i, n: 1 / n),  # beta_i = i / (i + 1): the plain average of the history
    (3, lambda i, n: 3 * (i + 1) * (i + 2) / (n * (n + 1) * (n + 2))),  # beta_i = i / (i + 3): weights ~ (i+1)(i+2)
])
def test_power_warm_up_with_power_one_is_a_polynomially_weighted_average(gen, gamma, weight):
    net = MLP(2, hidden=8, depth=1, emb_dim=4)
    ema = EMA(net, partial(power_decay, gamma=float(gamma), power=1.0))
    ws = _history(net, ema, 7, gen)
    assert ema.updates == 7 and sum(weight(i, 7) for i in range(7)) == pytest.approx(1)
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v.double(), sum(weight(i, 7) * w[k] for i, w in enumerate(ws)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decay, betas", [
    (partial(power_decay, gamma=2.0, power=0.75), [1 - (1 + n / 2) ** -0.75 for n in range(9)]),
    (partial(edm_decay, halflife=3.0, rampup=0.5), [0.0] + [0.5 ** (1 / min(3.0, 0.5 * n)) for n in range(1, 9)]),
    (partial(edm_decay, halflife=3.0, rampup=0.0), [0.5 ** (1 / 3)] * 9),  # no ramp-up: the init keeps a share
])
def test_ema_with_a_schedule_equals_its_weighted_history(gen, decay, betas):
    """shadow_n = prod_j beta_j w_init + sum_i (1 - beta_i) prod_{j > i} beta_j w_i, betas written out by hand."""
    net = MLP(2, hidden=8, depth=1, emb_dim=4)
    init = {k: v.double() for k, v in net.state_dict().items()}
    ema = EMA(net, decay)
    ws = _history(net, ema, len(betas), gen)
    tail = [math.prod(betas[i + 1:]) for i in range(len(betas))]
    for k, v in ema.shadow.items():
        want = math.prod(betas) * init[k] + sum((1 - b) * c * w[k] for b, c, w in zip(betas, tail, ws))
        torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"the EMA decay of update 0 must be in \[0, 1\), got 1.5"):
        EMA(net, lambda n: 1.5).update()


def test_ema_follows_the_live_model_tied_weights_and_integer_buffers(gen):
    """The EMA keeps references to the model's own tensors: it sees weights loaded with load_state_dict and
    moved with .to(), averages a weight shared by two modules under both names, and copies integer buffers."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a  # the same weights under a second name (both appear in the state dict)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

    net = Tied()
    ema = EMA(net, decay=0.5)
    assert set(ema.shadow) == set(net.state_dict()) == {"a.weight", "a.bias", "b.weight", "b.bias", "count"}
    start = ema.shadow["a.weight"].clone()
    new = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else torch.tensor(7)
           for k, v in net.state_dict().items()}
    new["b.weight"], new["b.bias"] = new["a.weight"], new["a.bias"]
    net.load_state_dict(new)
    net.to(torch.float32)  # a no-op conversion keeps the Parameter objects
    ema.update()
    for name in ("a.weight", "b.weight"):
        torch.testing.assert_close(ema.shadow[name], 0.5 * start + 0.5 * new["a.weight"])
    assert ema.shadow["count"].item() == 7
