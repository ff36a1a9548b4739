"""Networks net(x, c) for score models, and an exponential moving average of weights.

`c` is one conditioning scalar per sample (shape (batch,)): the time t, or the noise
level c_noise = log(sigma / alpha) / 4 that `precond.ScoreModel` chooses to pass. Both
networks embed it with fixed sinusoidal features (Vaswani et al. 1706.03762; Song et al.
2011.13456 use the same for t) followed by a small MLP.

With `n_classes` = K > 0 the networks are class-conditional, net(x, c, y): a learned embedding
of the label y in {0..K-1} is added to the time embedding; label K is the null label ("no class"),
which `y=None` selects and label dropout trains, so one network gives both the conditional and
the unconditional score of classifier-free guidance (Ho & Salimans 2207.12598).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.errors import InvalidValueError
from ..core.validate import check, integer

__all__ = ["SinusoidalEmbedding", "MLP", "UNet", "EMA", "power_decay", "edm_decay"]


class SinusoidalEmbedding(nn.Module):
    """c -> [sin(f_k c), cos(f_k c)], k < dim / 2, frequencies geometric in [min_freq, max_freq].

    The defaults resolve c in [1e-3, 1] (times) and c_noise in about [-3, 3] alike.
    """

    def __init__(self, dim: int, min_freq: float = 0.1, max_freq: float = 200.0):
        super().__init__()
        integer("dim", dim, 2)
        if dim % 2:
            raise InvalidValueError(f"dim must be even, got {dim}")
        if not 0 < min_freq < max_freq:
            raise InvalidValueError(f"need 0 < min_freq < max_freq, got {min_freq}, {max_freq}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2, dtype=torch.float64))
        freqs = freqs.to(torch.get_default_dtype())
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        if c.dim() != 1:
            raise InvalidValueError(f"the conditioning must have shape (batch,), got {tuple(c.shape)}")
        arg = c[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=1)


EMB_FREQS = (0.1, 200.0)


def _time_mlp(emb_dim: int, width: int, freqs: Sequence[float]) -> nn.Sequential:
    freqs = tuple(freqs) if isinstance(freqs, (list, tuple)) else (freqs,)
    if len(freqs) != 2 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in freqs) \
            or not 0 < freqs[0] < freqs[1] < math.inf:
        raise InvalidValueError(f"emb_freqs must be two finite numbers [min, max] with 0 < min < max, got {freqs!r}")
    return nn.Sequential(SinusoidalEmbedding(emb_dim, *map(float, freqs)), nn.Linear(emb_dim, width), nn.SiLU(),
                         nn.Linear(width, width))


class LabelEmbedding(nn.Module):
    """y in {0..n_classes} (n_classes = null label) -> (batch, width); y=None -> the null label."""

    def __init__(self, n_classes: int, width: int):
        super().__init__()
        self.n_classes = n_classes
        self.table = nn.Embedding(n_classes + 1, width)

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.n_classes, dtype=torch.long, device=device)
        if y.shape != (batch,) or y.dtype not in (torch.int32, torch.int64):
            raise InvalidValueError(f"labels y must be integers of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
        if bool(((y < 0) | (y > self.n_classes)).any()):
            raise InvalidValueError(f"labels y must lie in 0..{self.n_classes} ({self.n_classes} = null label)")
        return self.table(y)


def _embed(module: nn.Module, c: Tensor, y: Tensor | None) -> Tensor:
    """silu(time embedding + label embedding); an unconditional network refuses labels."""
    e = module.embed(c)
    if module.label is not None:
        e = e + module.label(y, c.shape[0], c.device)
    elif y is not None:
        raise InvalidValueError("this network is unconditional (n_classes=0) but labels y were given")
    return F.silu(e)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer so that a fresh network outputs 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class MLP(nn.Module):
    """Residual MLP for vector data: x (batch, dim), c (batch,) -> (batch, dim).

    depth residual blocks h <- h + W2 silu(W1 silu(h) + E c_emb), output layer zero-initialised;
    `n_classes` > 0: class-conditional, forward(x, c, y) (module docstring); `emb_freqs`: the
    sinusoids' frequency range [min, max] (`SinusoidalEmbedding`).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 64, n_classes: int = 0,
                 emb_freqs: Sequence[float] = EMB_FREQS):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 1), ("emb_dim", emb_dim, 2),
                                 ("n_classes", n_classes, 0)):
            integer(name, value, low)
        self.dim, self.n_classes = dim, n_classes
        self.embed = _time_mlp(emb_dim, hidden, emb_freqs)
        self.label = LabelEmbedding(n_classes, hidden) if n_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"lin1": nn.Linear(hidden, hidden), "emb": nn.Linear(hidden, hidden),
                           "lin2": nn.Linear(hidden, hidden)}) for _ in range(depth))
        self.out = _zero(nn.Linear(hidden, dim))

    def forward(self, x: Tensor, c: Tensor, y: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InvalidValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        e = _embed(self, c, y)
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["lin2"](F.silu(b["lin1"](F.silu(h)) + b["emb"](e)))
        return self.out(F.silu(h))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, 1x1 skip if widths differ;
    `attention`: self-attention on the output."""

    def __init__(self, c_in: int, c_out: int, emb: int, groups: int, dropout: float, attention: bool = False,
                 zero_init: bool = True):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.drop = _norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if zero_init:
            _zero(self.conv2)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, groups) if attention else None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        h = self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))
        return h if self.attn is None else self.attn(h)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual, output projection zero-initialised."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, 1, H * W, 3, C)  # a view if channels-last
        h = F.scaled_dot_product_attention(*qkv.unbind(3))  # softmax(q k^T / sqrt(C)) v, (B, 1, HW, C)
        return x + self.proj(h.reshape(B, H, W, C).permute(0, 3, 1, 2))


class UNet(nn.Module):
    """A small U-Net for images x (batch, channels, H, W), c (batch,) -> same shape as x.

    `n_classes` > 0: class-conditional, forward(x, c, y) (module docstring). Level i has width base * mults[i] and `num_res` residual blocks; levels are joined by
    stride-2 convolutions down and nearest-neighbour upsampling + conv up, so H and W must be
    multiples of 2^(len(mults) - 1) (28 px with 3 levels: 28, 14, 7). `attention=True` adds
    self-attention at the lowest resolution (middle block); `attention_levels` after every residual
    block of those levels (level i works at H / 2^i: at 32 px, (1, 2) = 16x16 and 8x8).
    `zero_init`: the output conv and the last conv of every residual block start at zero (a fresh network
    outputs 0, every block is the identity); false: PyTorch's default initialisation throughout.
    `emb_freqs`: the frequency range [min, max] of the `emb_dim` sinusoids of c (`SinusoidalEmbedding`).
    """

    def __init__(self, channels: int = 1, base: int = 32, mults: Sequence[int] = (1, 2), attention: bool = False,
                 num_res: int = 1, emb_dim: int = 64, groups: int = 8, dropout: float = 0.0, n_classes: int = 0,
                 attention_levels: Sequence[int] = (), zero_init: bool = True,
                 emb_freqs: Sequence[float] = EMB_FREQS):
        super().__init__()
        if not isinstance(zero_init, bool):
            raise InvalidValueError(f"zero_init must be true or false, got {zero_init!r}")
        for name, value, low in (("channels", channels, 1), ("base", base, 1), ("num_res", num_res, 1),
                                 ("emb_dim", emb_dim, 2), ("groups", groups, 1), ("n_classes", n_classes, 0)):
            integer(name, value, low)
        mults = tuple(mults)
        if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
            raise InvalidValueError(f"mults must be a non-empty sequence of integers >= 1, got {mults!r}")
        check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
        levels = tuple(attention_levels)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(mults) for i in levels) \
                or len(set(levels)) < len(levels):
            raise InvalidValueError(f"attention_levels must be distinct level indices in 0..{len(mults) - 1} "
                             f"(level i works at H / 2^i), got {attention_levels!r}")
        self.channels, self.factor, self.n_classes = channels, 2 ** (len(mults) - 1), n_classes
        emb = 4 * base
        self.embed = _time_mlp(emb_dim, emb, emb_freqs)
        self.label = LabelEmbedding(n_classes, emb) if n_classes else None
        self.inp = nn.Conv2d(channels, base, 3, padding=1)
        widths = [base * m for m in mults]
        self.down, skips, c = nn.ModuleList(), [base], base
        for i, w in enumerate(widths):
            for _ in range(num_res):
                self.down.append(ResBlock(c, w, emb, groups, dropout, i in levels, zero_init))
                c = w
                skips.append(c)
            if i < len(widths) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb, groups, dropout, zero_init=zero_init)
        self.attn = Attention(c, groups) if attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb, groups, dropout, zero_init=zero_init)
        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb, groups, dropout, i in levels, zero_init))
                c = w
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
        out = nn.Conv2d(c, channels, 3, padding=1)
        self.out = nn.Sequential(_norm(c, groups), nn.SiLU(), _zero(out) if zero_init else out)
        self.to(memory_format=torch.channels_last)  # faster convolutions (oneDNN, cuDNN); the output is contiguous

    def forward(self, x: Tensor, c: Tensor, y: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise InvalidValueError(f"x must have shape (batch, {self.channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise InvalidValueError(f"H and W must be multiples of {self.factor} for {self.factor.bit_length()} levels, "
                             f"got {tuple(x.shape[2:])}")
        e = _embed(self, c, y)
        h = self.inp(x.contiguous(memory_format=torch.channels_last))
        hs = [h]
        for m in self.down:
            h = m(h, e) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = self.mid2(self.attn(self.mid1(h, e)), e)
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], 1), e) if isinstance(m, ResBlock) else m(h)
        return self.out(h).contiguous()


def power_decay(n: int, gamma: float = 1.0, power: float = 0.75) -> float:
    """The warm-up decay beta_n = 1 - (1 + n / gamma)^(-power) of the n-th update (n = 0, 1, ...; beta_0 = 0):
    ema-pytorch's `EMA(inv_gamma, power)` and diffusers' `EMAModel(use_ema_warmup=True)`. With power = 1 and
    an integer gamma the average weighs the i-th weights by (i + 1)(i + 2)...(i + gamma - 1): the power-function
    profile (weights ~ i^(gamma - 1)) of Karras et al. 2312.02696."""
    return 1.0 - (1.0 + n / gamma) ** -power


def edm_decay(n: int, halflife: float = 1000.0, rampup: float = 0.05) -> float:
    """EDM's decay (Karras et al. 2206.00364, training loop of its code): beta_n = 0.5^(1 / h_n), a half-life
    of h_n = min(halflife, rampup * n) updates (rampup = 0: h_n = halflife); beta_0 = 0 when rampup > 0."""
    h = min(halflife, rampup * n) if rampup > 0 else halflife
    return 0.5 ** (1.0 / h) if h > 0 else 0.0


class EMA:
    """Exponential moving average of a model's floating-point state: shadow <- beta_n shadow + (1 - beta_n) w
    at the n-th `update()` (n = 0, 1, ...), so shadow = sum_i w_i (1 - beta_i) prod_{j > i} beta_j + the
    initial weights times prod_j beta_j (none when beta_0 = 0, as in the warm-up schedules).

    `decay`: a constant beta, or a schedule n -> beta_n (`power_decay`, `edm_decay`, bound with
    functools.partial). `updates` counts the updates (checkpointed by `running.checkpoint`);
    `state_dict()` / `load_state_dict()` hold the shadow as plain tensors; evaluate with
    `average_parameters()` (swaps the weights in and restores them exactly) or `copy()` (a frozen copy).
    """

    def __init__(self, model: nn.Module, decay: float | Callable[[int], float] = 0.999):
        if not callable(decay):
            check("decay", decay, 0 <= decay < 1, "in [0, 1) or a schedule n -> beta_n")
            decay = float(decay)
        self.model, self.decay, self.updates = model, decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # the live tensors behind the state dict (the Parameters and buffers themselves, so a later `.to()`
        # or `load_state_dict` of the model is followed), split once into floats (averaged) and the rest (copied)
        live = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        self._floats = ([self.shadow[k] for k in self.shadow if live[k].is_floating_point()],
                        [live[k] for k in self.shadow if live[k].is_floating_point()])
        self._others = [(self.shadow[k], live[k]) for k in self.shadow if not live[k].is_floating_point()]

    def beta(self, n: int) -> float:
        """The decay of the n-th update."""
        beta = self.decay(n) if callable(self.decay) else self.decay
        check(f"the EMA decay of update {n}", beta, 0 <= beta < 1, "in [0, 1)")
        return beta

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(*self._floats, 1.0 - self.beta(self.updates))
        for shadow, live in self._others:
            shadow.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or extra:
            raise InvalidValueError(f"EMA state does not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        with torch.no_grad():
            for k, v in state.items():
                if v.shape != self.shadow[k].shape:
                    raise InvalidValueError(f"EMA state {k!r} has shape {tuple(v.shape)}, model has {tuple(self.shadow[k].shape)}")
                self.shadow[k].copy_(v)

    @contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """Within the block the model holds the EMA weights; its own weights come back after."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(saved)

    def copy(self) -> nn.Module:
        """A deep copy of the model holding the EMA weights, in eval mode, without gradients."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.shadow)
        return model.eval().requires_grad_(False)
