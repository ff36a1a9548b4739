"""running.export: a run's EMA weights and JSON out, `load_model` back; the CLI's `export` command."""
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import scoresde
from scoresde.cli import app
from scoresde.running.build import draw_samples
from scoresde.running.checkpoint import CHECKPOINT, read_checkpoint
from scoresde.running.export import SPEC, WEIGHTS, export_run, load_model, load_sde
from scoresde.running.runs import load_run, sample_run


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    export_run(tiny_run, out)
    return out


def test_loaded_score_equals_the_runs_ema_score(tiny_run, exported):
    run, model = load_run(tiny_run), scoresde.load_model(exported)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(64, 2, generator=g), 1e-3 + torch.rand(64, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x, t), run.model(x, t))


def test_sampling_the_export_equals_sampling_the_run(tiny_run, exported):
    run = load_run(tiny_run)
    ref, _ = sample_run(run, 40, method="em", nfe=15, seed=5)
    x, _ = draw_samples(load_sde(exported), load_model(exported), (40, 2), "em", 15,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, ref)


def test_file_holds_the_ema_weights_only(tiny_run, exported):
    tensors, _ = read_checkpoint(tiny_run / CHECKPOINT)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
    assert any(k.startswith("optim/") for k in tensors)  # the checkpoint has optimiser state; the export must not
    with safe_open(exported / WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(ema) and all(torch.equal(f.get_tensor(k), ema[k]) for k in keys)
    spec = json.loads((exported / SPEC).read_text())
    assert spec["sample_shape"] == [2] and spec["net"] == "mlp" and spec["version"] == scoresde.__version__


def _copy(src, dst):
    dst.mkdir()
    for name in (WEIGHTS, SPEC):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_damaged_weights_are_refused(exported, tmp_path):
    bad = _copy(exported, tmp_path / "bad")
    blob = bytearray((bad / WEIGHTS).read_bytes())
    blob[-3] ^= 0xFF
    (bad / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match .*SHA-256"):
        load_model(bad)


def test_json_that_does_not_describe_the_weights_is_refused(exported, tmp_path):
    bad = _copy(exported, tmp_path / "bad")
    spec = json.loads((bad / SPEC).read_text())
    spec["net_args"]["hidden"] = 32
    (bad / SPEC).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not describe the weights.*shape mismatch"):
        load_model(bad)
    (bad / SPEC).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_model(tmp_path / "nowhere")


def test_an_export_from_before_c_noise_loads_as_log_sigma(exported, tmp_path):
    old = _copy(exported, tmp_path / "old")
    spec = json.loads((old / SPEC).read_text())
    del spec["c_noise"]
    (old / SPEC).write_text(json.dumps(spec))
    assert load_model(old).c_noise == "log_sigma"


def test_a_time_conditioned_run_exports_and_loads_its_conditioning(tiny_config, tmp_path):
    from scoresde.running.train import Trainer

    cfg = tiny_config(name="tcond", steps=2, checkpoint_every=2, c_noise="time")
    Trainer(cfg).run()
    export_run(cfg.run_dir, tmp_path / "m")
    model, run = load_model(tmp_path / "m"), load_run(cfg.run_dir)
    assert model.c_noise == run.model.c_noise == "time"
    x, t = torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), torch.linspace(0.01, 1, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t), run.model(x, t))


def test_cli_export(tiny_run, tmp_path):
    res = CliRunner().invoke(app, ["export", str(tiny_run), str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / WEIGHTS).is_file() and (tmp_path / "m" / SPEC).is_file()
    res = CliRunner().invoke(app, ["export", str(tmp_path), str(tmp_path / "m2")])
    assert res.exit_code != 0 and "is not a run folder" in res.output


def test_export_of_a_run_on_api_data_takes_the_recorded_shape(tiny_config, tmp_path):
    """A run trained on 3-D points given to the Trainer (its config still says moons, 2-D) exports a model of
    3-D samples, with the data record in its JSON."""
    from scoresde.running.data import Dataset, read_data_record
    from scoresde.running.train import Trainer

    g = torch.Generator().manual_seed(0)
    cfg = tiny_config(name="api", steps=2, checkpoint_every=2)
    Trainer(cfg, data=Dataset(torch.randn(50, 3, generator=g), torch.randn(10, 3, generator=g), "mine")).run()
    export_run(cfg.run_dir, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / SPEC).read_text())
    assert spec["sample_shape"] == [3] and spec["data"] == read_data_record(cfg.run_dir)
    assert load_model(tmp_path / "m")(torch.zeros(4, 3), torch.full((4,), 0.5)).shape == (4, 3)
