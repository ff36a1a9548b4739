from pathlib import Path

import pytest
import yaml

from scoresde.running.config import Config, apply_overrides, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("data: checkerboard\nsteps: 100\nnet_args: {hidden: 64}\nlr: 1\n")
    cfg = load_config(p, ["steps=7", "net_args.depth=2", "sde_args.beta_max=10.5", "loss_args.weighting=g2"])
    assert cfg.name == "exp" and cfg.data == "checkerboard" and cfg.steps == 7
    assert cfg.net_args == {"hidden": 64, "depth": 2} and cfg.sde_args == {"beta_max": 10.5}
    assert cfg.loss_args == {"weighting": "g2"}
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # ints are accepted for floats
    assert cfg.run_dir == Path("runs") / "exp"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["net_args"] == {"hidden": 64, "depth": 2}


def test_errors_name_the_key_and_list_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'stpes'; valid: name, out, seed"):
        load_config(None, ["stpes=3"])
    p = tmp_path / "bad.yaml"
    p.write_text("bogus: 1\nsteps: 3\n")
    with pytest.raises(ValueError, match="unknown config key.*bogus; valid:"):
        load_config(p)
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ValueError, match="steps must be of type int, got 'many'"):
        load_config(None, ["steps=many"])
    with pytest.raises(ValueError, match="lr is not a dict-valued key"):
        apply_overrides({}, ["lr.x=1"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Config(steps=0)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        Config(ema_decay=1.0)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        Config(lr_schedule="step")
    with pytest.raises(FileNotFoundError, match="missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(p)


def test_training_keys_and_the_ema_schedule_resolution(tmp_path):
    """New configs get the power warm-up; one that sets ema_decay keeps its constant schedule; the saved config
    holds the resolved schedule and reads back equal."""
    cfg = Config()
    assert (cfg.ema_schedule, cfg.ema_decay, cfg.precision, cfg.accumulate, cfg.compile) == ("power", None, "fp32", 1, False)
    assert Config(ema_decay=0.99).ema_schedule == "constant"
    for overrides in (["ema_decay=0.99"], ["ema_schedule=edm", "ema_halflife=500"], ["precision=bf16", "accumulate=4"]):
        cfg = load_config(None, overrides)
        save_config(cfg, tmp_path / "c.yaml")
        assert load_config(tmp_path / "c.yaml") == cfg
    bad = [(dict(ema_schedule="karras"), "ema_schedule must be one of power, edm, constant, got 'karras'"),
           (dict(ema_schedule="constant"), r"ema_decay must be in \[0, 1\) for ema_schedule constant, got None"),
           (dict(ema_schedule="power", ema_decay=0.9), "ema_decay sets the constant schedule; ema_schedule power is "
                                                       "set by ema_gamma and ema_power"),
           (dict(ema_schedule="edm", ema_decay=0.9), "ema_schedule edm is set by ema_halflife and ema_rampup"),
           (dict(ema_power=0), "ema_power must be > 0"), (dict(ema_gamma=-1), "ema_gamma must be > 0"),
           (dict(ema_halflife=0), "ema_halflife must be > 0"), (dict(ema_rampup=-0.1), "ema_rampup must be >= 0"),
           (dict(precision="fp8"), "precision must be one of fp32, bf16, fp16, auto, got 'fp8'"),
           (dict(accumulate=0), "accumulate must be >= 1, got 0"), (dict(compile="yes"), "compile must be of type bool"),
           (dict(ema_decay="high"), "ema_decay must be of type float, got 'high'")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            Config(**kw)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_build(path):
    """Every config in configs/ resolves: its SDE, network (on its data's shape), and a loss and sampler its
    family's record accepts; a score model returns a score-shaped output, a family with its own sampler draws."""
    from scoresde.running.build import build_model, build_sde, check_config, draw_samples
    from scoresde.running.data import load_dataset

    cfg = load_config(path)
    family = check_config(cfg)
    data = load_dataset(cfg.data, n_train=16, n_test=4, pad_to=cfg.pad_to)
    sde = build_sde(cfg)
    model = build_model(cfg, sde, data.sample_shape)
    x0 = data.test[:4]  # mnist's held-out split is fixed at 500 whatever n_test says
    if family.generate is None:  # a score model, or a consistency run's x0-parametrised score network
        assert model(x0, x0.new_full((x0.shape[0],), 0.5)).shape == x0.shape
    else:  # the family's own sampler (VAE, discrete DDPM), at its cheapest budget
        x, _ = draw_samples(sde, model, tuple(x0.shape), cfg.sampler, min(cfg.nfe, 2), family=family)
        assert x.shape == x0.shape


def test_at_least_the_issue_configs_exist():
    assert {"moons", "checkerboard", "swiss_roll", "mixture16", "digits"} <= {p.stem for p in CONFIGS}


SPELLINGS = ["2e-3", "1e-4", "1E5", ".5", "-3e-2", "+1.5e+2", "6.02E23", "1.", "-.25", "1_000.5", "3.0e-0"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_yaml_1_2_floats_in_files_and_overrides(text, tmp_path):
    """PyYAML (YAML 1.1) reads 2e-3 as a string; read_yaml, config files and overrides read every float
    spelling as Python's float() does, and leave ints and strings alone."""
    from scoresde.running.config import read_yaml

    truth = float(text.replace("_", ""))
    assert read_yaml(text) == truth and isinstance(read_yaml(text), float)
    p = tmp_path / "c.yaml"
    p.write_text(f"sigma_data: {text.lstrip('-')}\nnet_args: {{x: {text}}}\n")
    assert read_yaml(p)["net_args"]["x"] == truth
    assert load_config(p).sigma_data == abs(truth)
    assert load_config(None, [f"loss_args.w={text}"]).loss_args["w"] == truth


def test_yaml_keeps_ints_and_strings_and_names_the_line_of_an_error(tmp_path):
    from scoresde.core.errors import InvalidValueError
    from scoresde.running.config import read_yaml

    assert read_yaml("a: 12\nb: 0x10\nc: 1e\nd: e5\ne: .inf\nf: abc") == {"a": 12, "b": 16, "c": "1e", "d": "e5",
                                                                       "e": float("inf"), "f": "abc"}
    assert load_config(None, ["steps=1e3", "warmup=10"]).steps == 1000  # an integral float is an int
    with pytest.raises(ValueError, match="steps must be of type int, got 1.5"):
        load_config(None, ["steps=1.5"])
    p = tmp_path / "bad.yaml"
    p.write_text("lr: 1e-3\nnet_args: [1, 2\nsteps: 3\n")
    with pytest.raises(InvalidValueError, match=r"config file '.*bad.yaml' is not valid YAML at line 3, column 6"):
        load_config(p)
    with pytest.raises(InvalidValueError, match=r"YAML file '.*bad.yaml' is not valid YAML at line 3"):
        read_yaml(p)
    with pytest.raises(InvalidValueError, match=r"override 'net_args=\{a: 1' is not valid YAML"):
        load_config(None, ["net_args={a: 1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_warm_up_within_their_steps(path):
    cfg = load_config(path)
    assert cfg.warmup <= cfg.steps


def test_a_folder_given_as_the_config_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"config file .* is a folder; give a YAML file"):
        load_config(tmp_path)
