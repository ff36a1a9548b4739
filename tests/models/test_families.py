"""Class-conditional networks, guidance through the real network, the model families in the Trainer,
and the CLI commands sample --label / inpaint on tiny digits runs (issue 12)."""
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scoresde.cli import app
from scoresde.core.precond import ScoreModel
from scoresde.core.sde import VE, VP
from scoresde.learning.networks import MLP, UNet
from scoresde.models.ddpm import DDPMModel, DDPMSchedule, ddpm_sample
from scoresde.models.ncsn import ncsn_loss, ncsn_sigmas, ncsn_train_loss
from scoresde.models.vae import ConvVAE
from scoresde.learning.losses import LOSSES
from scoresde.models import FAMILIES, Family
from scoresde.running.build import build_model, check_config, draw_samples, family_of
from scoresde.running.config import Config
from scoresde.running.consistency_train import ConsistencyTrainer
from scoresde.running.data import load_mask
from scoresde.running.runs import sample_run
from scoresde.running.train import Trainer
from scoresde.running.trainers import TRAINERS, trainer_for
from scoresde.sampling.methods import METHODS
from scoresde.sampling.guidance import classifier_free, label_guided

runner = CliRunner()


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Undo the zero initialisation so that outputs depend on every input (labels included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("make, shape", [(lambda: MLP(3, hidden=16, depth=1, emb_dim=8, n_classes=4), (6, 3)),
                                         (lambda: UNet(1, base=8, mults=(1, 2), n_classes=4), (6, 1, 8, 8))])
def test_conditional_network_labels_and_null_label(make, shape, gen):
    net = _randomise(make())
    x, c = torch.randn(shape, generator=gen), torch.rand(shape[0], generator=gen)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out = net(x, c, y)
    assert out.shape == x.shape
    assert not torch.allclose(net(x, c, (y + 1) % 4), out)  # the label enters
    torch.testing.assert_close(net(x, c), net(x, c, torch.full((6,), 4)))  # y=None is the null label 4
    torch.testing.assert_close(net(x[:2], c[:2], y[:2]), out[:2], rtol=1e-5, atol=1e-5)  # no mixing across the batch
    for bad in (torch.full((6,), 5), torch.full((6,), -1), torch.zeros(5, dtype=torch.long), torch.zeros(6)):
        with pytest.raises(ValueError, match="labels y"):
            net(x, c, bad)


def test_unconditional_network_refuses_labels(gen):
    net = MLP(2, hidden=8, depth=1, emb_dim=8)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(3, 2, generator=gen), torch.rand(3, generator=gen), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_classes"):
        MLP(2, n_classes=-1)


def test_guidance_weight_zero_is_the_conditional_model_through_the_real_network(gen):
    model = ScoreModel(_randomise(UNet(1, base=8, mults=(1, 2), n_classes=10)), VP())
    x, t = torch.randn(5, 1, 8, 8, generator=gen), torch.rand(5, generator=gen) * 0.9 + 0.05
    y = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        s_c, s_u = model(x, t, y), model(x, t, torch.full((5,), 10))
        torch.testing.assert_close(classifier_free(model, y, 0.0)(x, t), s_c)
        torch.testing.assert_close(label_guided(model, y, 5, 0.0)(x, t), s_c)
        torch.testing.assert_close(label_guided(model, y, 5, 2.0)(x, t), 3 * s_c - 2 * s_u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(label_guided(model, 3, 5, 1.0)(x, t),
                                   2 * model(x, t, torch.full((5,), 3)) - s_u, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s_c, s_u)
    for bad in (10, -1, torch.zeros(4, dtype=torch.long)):
        with pytest.raises(ValueError, match="label"):
            label_guided(model, bad, 5, 1.0)
    with pytest.raises(ValueError, match="unconditional"):
        label_guided(ScoreModel(UNet(1, base=8, mults=(1, 2)), VP()), 3, 5)


def _digits_cfg(tmp_path, **kw) -> Config:
    base = dict(name="t", out=str(tmp_path), data="digits", n_test=50, net="unet", net_args={"base": 8, "mults": [1, 2]},
                steps=2, batch_size=16, eval_every=0, checkpoint_every=2, progress=False, nfe=5, sampler="dpm2m",
                warmup=1)
    base.update(kw)
    return Config(**base)


def test_label_dropout_replaces_labels_by_the_null_label(tmp_path):
    tr = Trainer(_digits_cfg(tmp_path, net_args={"base": 8, "mults": [1, 2], "n_classes": 10}, label_dropout=0.3))
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    bound = tr._labelled(y, torch.Generator().manual_seed(1))
    dropped = bound.keywords["y"] == 10
    assert torch.equal(bound.keywords["y"][~dropped], y[~dropped])
    sd = math.sqrt(0.3 * 0.7 / y.numel())
    assert abs(dropped.float().mean().item() - 0.3) < 5 * sd
    tr.cfg.label_dropout = 0.0
    assert torch.equal(tr._labelled(y, torch.Generator()).keywords["y"], y)
    tr.cfg.label_dropout = 1.0
    assert (tr._labelled(y, torch.Generator()).keywords["y"] == 10).all()
    x0, labels, *_ = tr._batch(0)
    assert labels.shape == (16,) and labels.max() < 10
    tr.run()  # the conditional training step runs through the loss
    assert tr.step == 2


def test_conditional_net_needs_labelled_data(tmp_path):
    with pytest.raises(ValueError, match="labelled data"):
        Trainer(_digits_cfg(tmp_path, data="moons", net="mlp", net_args={"hidden": 8, "n_classes": 3}))


def test_ddpm_respacing_and_generate(gen):
    s = DDPMSchedule.linear(100)
    r, idx = s.respace(10)
    assert idx[0] == 0 and idx[-1] == 99 and len(idx) == 10
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[idx])
    full, idx_full = s.respace(100)
    torch.testing.assert_close(full.betas, s.betas)
    assert torch.equal(idx_full, torch.arange(100))
    with pytest.raises(ValueError, match="n_steps"):
        s.respace(101)
    model = DDPMModel(_randomise(UNet(1, base=8, mults=(1, 2))), s)
    with torch.no_grad():
        a = model.generate((3, 1, 8, 8), nfe=100, generator=torch.Generator().manual_seed(5))
        b = ddpm_sample(lambda x, i: model.net(x, i.float() / 100), s, (3, 1, 8, 8),
                        generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="ddpm"):
        model.generate((3, 1, 8, 8), method="em", nfe=10)


def test_ncsn_train_loss_feeds_the_time_of_each_level(gen):
    sde = VE(sigma_max=20.0)
    sigmas = ncsn_sigmas(sde, 7)
    assert sigmas[0] == pytest.approx(float(sde.sigma(torch.tensor(sde.T, dtype=torch.float64))), rel=1e-9)
    assert sigmas[-1] == pytest.approx(float(sde.sigma(torch.tensor(sde.t_min, dtype=torch.float64))), rel=1e-9)
    seen = []

    def score(x, t):
        seen.append(sde.sigma(t))
        return -x / (1 + sde.sigma(t)[:, None] ** 2)

    x0 = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    loss = ncsn_train_loss(score, sde, x0, generator=torch.Generator().manual_seed(3), n_levels=7)
    ref = ncsn_loss(lambda x, s: -x / (1 + s[:, None] ** 2), sigmas, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, ref)
    assert torch.isclose(seen[0][:, None], sigmas[None], rtol=1e-9).any(1).all()  # sigma(t) is a level
    with pytest.raises(ValueError, match="variance-exploding"):
        ncsn_train_loss(score, VP(), x0)


def test_vae_and_ddpm_families_train_and_sample_through_the_trainer(tmp_path):
    vae = Trainer(_digits_cfg(tmp_path, name="vae", model="vae", loss="vae", sampler="decoder", nfe=1,
                              model_args={"latent_dim": 4, "base": 8, "levels": 17})).run()
    assert isinstance(vae.model, ConvVAE) and vae.model.levels == 17 and vae.family is FAMILIES["vae"]
    x0 = vae.data.test[:4]
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(vae.loss_fn(vae.model, vae.sde, x0, generator=g),
                               -vae.model.elbo(x0, torch.Generator().manual_seed(0)))
    x, _ = draw_samples(vae.sde, vae.ema.copy(), (3, 1, 8, 8), "decoder", 1, generator=torch.Generator().manual_seed(4),
                        family=vae.family)
    torch.testing.assert_close(x, vae.ema.copy().sample(3, torch.Generator().manual_seed(4)))  # decoder means
    with pytest.raises(ValueError, match="does not apply to a 'vae' model; valid: decoder"):
        draw_samples(vae.sde, vae.model, (3, 1, 8, 8), "em", 1, family=vae.family)
    with pytest.raises(ValueError, match="method 'decoder'"):  # the VAE itself refuses what it cannot honour
        vae.model.generate((3, 1, 8, 8), method="em", nfe=1)
    with pytest.raises(ValueError, match="nfe must be 1"):
        vae.model.generate((3, 1, 8, 8), nfe=5)
    ddpm = Trainer(_digits_cfg(tmp_path, name="ddpm", model="ddpm", loss="ddpm", sampler="ddpm",
                               model_args={"n_steps": 50})).run()
    assert ddpm.model.schedule.n_steps == 50
    x, _ = draw_samples(ddpm.sde, ddpm.ema.copy(), (3, 1, 8, 8), "ddpm", 5, generator=g, family=ddpm.family)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="takes no sampler options"):
        draw_samples(ddpm.sde, ddpm.model, (3, 1, 8, 8), "ddpm", 5, family=ddpm.family, t_end=0.1)
    with pytest.raises(ValueError, match="model_args for 'ddpm'"):
        Trainer(_digits_cfg(tmp_path, name="bad", model="ddpm", loss="ddpm", sampler="ddpm", model_args={"steps": 3}))
    with pytest.raises(ValueError, match="unknown model 'gan'"):
        Trainer(_digits_cfg(tmp_path, name="bad", model="gan"))


def test_config_is_checked_against_the_family_record(tmp_path):
    """Model, loss and sampler must fit the record: clear errors naming what is allowed."""
    for kw, match in ((dict(model="vae", loss="vae"), "sampling method 'dpm2m' does not apply to a 'vae' model; "
                                                      "valid: decoder"),
                      (dict(model="vae", loss="denoising"), "model 'vae' trains with loss vae; got loss 'denoising'"),
                      (dict(model="ddpm", loss="ddpm", sampler="ddim"), "valid: ddpm"),
                      (dict(loss="ddpm"), "model 'score' trains with loss denoising, sliced"),
                      (dict(loss="consistency", parametrization="x0"), "does not apply to a 'consistency' model"),
                      (dict(sampler="consistency"), "does not apply to a 'score' model"),
                      (dict(model="ddpm", loss="ddpm", sampler="ddpm", c_noise="time"),
                       "c_noise conditions the network of a score model; model 'ddpm'")):
        with pytest.raises(ValueError, match=match):
            check_config(_digits_cfg(tmp_path, **kw))
    with pytest.raises(ValueError, match="parametrization x0"):
        build_model(_digits_cfg(tmp_path, loss="consistency", sampler="consistency"), VP(), (1, 8, 8))


def test_family_records():
    """Defaults first and equal to Config's; every loss of a family trained by the plain Trainer is a LOSSES
    entry; a family sampled by `sampling.sample` accepts exactly the METHODS that take its kind of model (a
    family with its own sampler names its own methods: the DDPM family's "ddpm" is its discrete chain)."""
    cfg = Config()
    score = FAMILIES["score"]
    assert (score.losses[0], score.methods[0]) == (cfg.loss, cfg.sampler) and family_of(cfg) is score
    for name in FAMILIES:
        for loss in FAMILIES[name].losses:
            family = FAMILIES[name].for_loss(loss)
            if TRAINERS.get(family.name, Trainer) is Trainer:
                assert loss in LOSSES, (name, loss)
            if family.generate is None:
                takes = "score" if family.has_score else "consistency"
                assert set(family.methods) == {m for m in METHODS if METHODS[m].takes == takes}, family.name
    cm = Config(loss="consistency", parametrization="x0", sampler="consistency")
    assert family_of(cm).name == "consistency" and not family_of(cm).has_score
    assert trainer_for(cm) is ConsistencyTrainer and trainer_for(cfg) is Trainer
    with pytest.raises(ValueError, match="likelihood needs a score model.*'vae'"):
        FAMILIES["vae"].require("likelihood")
    with pytest.raises(ValueError, match="evaluation must be one of"):
        score.require("fid")
    with pytest.raises(ValueError, match="need has_score=True"):
        Family("x", score.build, ("denoising",), ("em",), evaluations=frozenset({"likelihood"}))
    with pytest.raises(ValueError, match="variants must be keyed by its losses"):
        Family("x", score.build, ("denoising",), ("em",), variants={"vae": score})


def test_load_mask_from_npy_and_png(tmp_path):
    m = np.zeros((8, 8))
    m[:, :3] = 1
    np.save(tmp_path / "m.npy", m)
    import matplotlib.pyplot as plt

    plt.imsave(tmp_path / "m.png", m, cmap="gray", vmin=0, vmax=1)
    for name in ("m.npy", "m.png"):
        mask = load_mask(tmp_path / name, (1, 8, 8))
        assert mask.shape == (1, 8, 8) and torch.equal(mask[0], torch.from_numpy(m).float())
    with pytest.raises(ValueError, match="shape"):
        load_mask(tmp_path / "m.npy", (1, 16, 16))
    with pytest.raises(ValueError, match=".npy or .png"):
        load_mask(tmp_path / "m.txt", (1, 8, 8))


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    cfg = tmp / "cond.yaml"
    cfg.write_text("data: digits\nn_test: 40\nnet: unet\nnet_args: {base: 8, mults: [1, 2], n_classes: 10}\n"
                   "label_dropout: 0.2\nsteps: 3\nbatch_size: 16\neval_every: 0\ncheckpoint_every: 3\n"
                   "nfe: 5\nsampler: dpm2m\nn_eval: 20\nprogress: false\n")
    res = runner.invoke(app, ["train", str(cfg), f"out={tmp}"])
    assert res.exit_code == 0, res.output
    return tmp / "cond"


def test_cli_sample_with_label_and_guidance(cond_run, tmp_path):
    res = runner.invoke(app, ["sample", str(cond_run), "--label", "3", "--guidance", "2.0", "--n", "6",
                              "--method", "dpm2m", "--nfe", "5", "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    res = runner.invoke(app, ["sample", str(cond_run), "--label", "10", "--n", "6", "--out", str(tmp_path / "y.npy")])
    assert res.exit_code == 2 and "label must hold" in res.output


def test_cli_inpaint_keeps_the_known_pixels(cond_run, tmp_path):
    m = np.zeros((8, 8))
    m[:4] = 1
    np.save(tmp_path / "mask.npy", m)
    res = runner.invoke(app, ["inpaint", str(cond_run), "--mask", str(tmp_path / "mask.npy"), "--n", "4",
                              "--nfe", "6", "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    from scoresde.running.runs import load_run

    known = load_run(cond_run).data.test[:4].numpy()
    x = np.load(tmp_path / "x.npy")
    np.testing.assert_array_equal(x[:, :, :4], known[:, :, :4])
    assert not np.allclose(x[:, :, 4:], known[:, :, 4:])
    res = runner.invoke(app, ["inpaint", str(cond_run), "--mask", str(tmp_path / "mask.npy"), "--n", "4",
                              "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 0 and (tmp_path / "x.png").stat().st_size > 0
    np.save(tmp_path / "bad.npy", np.ones((3, 3)))
    res = runner.invoke(app, ["inpaint", str(cond_run), "--mask", str(tmp_path / "bad.npy"), "--out",
                              str(tmp_path / "z.npy")])
    assert res.exit_code == 2 and "mask has shape" in res.output


def test_sample_run_with_a_label_draws_from_the_conditional_model(cond_run):
    """With guidance 0 the label-guided samples are the conditional model's: the same draws as sampling its
    score s(x, t, y) directly (classifier-free guidance itself: test_guidance_weight_zero_...)."""
    from scoresde.running.runs import load_run
    from scoresde.sampling import sample

    r = load_run(cond_run)
    x, _ = sample_run(r, 6, method="dpm2m", nfe=5, seed=2, label=3)
    y = torch.full((6,), 3)
    want = sample(r.sde, lambda x, t: r.model(x, t, y), (6, 1, 8, 8), method="dpm2m", nfe=5,
                  generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, want)
    with pytest.raises(ValueError, match="does not apply to a 'score' model"):
        sample_run(r, 6, method="decoder", nfe=1, label=3)


def test_inpaint_run_defaults_to_tweedie(cond_run):
    """runs.inpaint_run (the CLI's inpaint) uses the Tweedie h-transform unless told otherwise, and checks its input."""
    from scoresde.running.runs import inpaint_run, load_run
    from scoresde.sampling.guidance import inpaint

    r = load_run(cond_run)
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    known, m, x = inpaint_run(r, mask, 2, method="em", nfe=6, seed=1)
    want = inpaint(r.sde, r.model, r.data.test[:2], mask, method="tweedie", sampler="em", nfe=6,
                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, want)
    torch.testing.assert_close(known, r.data.test[:2])
    known, m, x = inpaint_run(r, mask, 2, how="smc", nfe=4, seed=1, particles=3)  # smc: Euler-Maruyama by default
    want = inpaint(r.sde, r.model, r.data.test[:2], mask, method="smc", sampler="em", nfe=4, particles=3,
                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, want)
    for kw, match in (({"how": "gibbs"}, "how must be one of tweedie, replace, smc"),
                      ({"method": "ddpm_x"}, "does not apply"), ({"how": "smc", "method": "heun"}, "em, ei")):
        with pytest.raises(ValueError, match=match):
            inpaint_run(r, mask, 2, **kw)


def test_cli_trains_a_consistency_run_distilled_from_a_run(cond_run, tmp_path):
    cfg = tmp_path / "cm.yaml"
    cfg.write_text("data: digits\nn_test: 40\nnet: unet\nnet_args: {base: 8, mults: [1, 2]}\nloss: consistency\n"
                   f"parametrization: x0\nloss_args: {{mode: cd, teacher: {cond_run}}}\nsteps: 2\nbatch_size: 8\n"
                   "eval_every: 0\ncheckpoint_every: 2\nsampler: consistency\nnfe: 1\nn_eval: 20\nprogress: false\n")
    res = runner.invoke(app, ["train", str(cfg), f"out={tmp_path}"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", str(tmp_path / "cm"), "--method", "consistency", "--nfe", "1", "--n", "4",
                              "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "x.npy").shape == (4, 1, 8, 8)



def test_a_run_saved_before_the_family_keys_existed_resumes(tmp_path):
    import yaml

    cfg = _digits_cfg(tmp_path, steps=3)
    Trainer(cfg).run(until=2)
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    for key in ("model", "model_args", "label_dropout"):  # as written by the trainer before issue 12
        del saved[key]
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert Trainer(cfg).step == 2
    with pytest.raises(ValueError, match="different config"):
        Trainer(_digits_cfg(tmp_path, steps=3, label_dropout=0.5))
