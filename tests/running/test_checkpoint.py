import json
import os

import pytest
import torch
from safetensors import safe_open

from scoresde.learning.networks import EMA, MLP
from scoresde.running import checkpoint as C


def _trained(gen, steps=3):
    torch.manual_seed(0)
    net = MLP(2, hidden=8, depth=1, emb_dim=4)
    ema = EMA(net, 0.9)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = net(torch.randn(16, 2, generator=gen), torch.rand(16, generator=gen)).pow(2).sum() \
            + sum(p.pow(2).sum() for p in net.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    return net, ema, opt


def test_round_trip_restores_everything(tmp_path, gen):
    net, ema, opt = _trained(gen)
    g = torch.Generator().manual_seed(42)
    torch.randn(5, generator=g)
    path = tmp_path / "c.safetensors"
    C.save_checkpoint(path, model=net, ema=ema, optimizer=opt, step=17, generators={"train": g}, extra={"a": [1, 2]})
    net2, ema2, opt2 = _trained(torch.Generator().manual_seed(99), steps=1)
    g2 = torch.Generator().manual_seed(0)
    step, extra = C.load_checkpoint(path, model=net2, ema=ema2, optimizer=opt2, generators={"train": g2})
    assert step == 17 and extra == {"a": [1, 2]}
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, ema2.shadow[k]) for k, v in ema.shadow.items())
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for i in s1["state"] for k in s1["state"][i])
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=g2))
    # the restored optimiser takes the same next step
    x, c = torch.randn(4, 2, generator=gen), torch.rand(4, generator=gen)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x, c).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net.state_dict().items())
    assert torch.equal(C.checkpoint_weights(path, "ema")["out.weight"], ema.shadow["out.weight"])


def test_file_is_plain_safetensors_with_json_metadata(tmp_path, gen):
    net, ema, opt = _trained(gen)
    path = tmp_path / "c.safetensors"
    C.save_checkpoint(path, model=net, ema=ema, optimizer=opt, step=3, generators={"train": gen})
    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("rng/gen/train").dtype == torch.uint8
    assert {k.split("/")[0] for k in keys} == {"model", "ema", "optim", "rng"}
    groups = json.loads(meta["optim"])["param_groups"]
    assert groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.1
    assert meta["step"] == "3" and meta["format"] == C.FORMAT
    assert b"pickle" not in path.read_bytes()[:200]


def test_atomic_write_keeps_old_checkpoint_on_failure(tmp_path, gen, monkeypatch):
    net, ema, opt = _trained(gen)
    path = tmp_path / "c.safetensors"
    C.save_checkpoint(path, model=net, step=1)
    old = path.read_bytes()

    def crash(src, dst):
        raise OSError("killed during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        C.save_checkpoint(path, model=net, ema=ema, optimizer=opt, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left
    (tmp_path / ".c.safetensors.zzz.tmp").write_bytes(b"partial")  # debris of a hard kill is ignored
    assert C.load_checkpoint(path, model=net)[0] == 1


def test_bad_checkpoints(tmp_path, gen):
    net, ema, opt = _trained(gen)
    path = tmp_path / "c.safetensors"
    C.save_checkpoint(path, model=net, step=1)
    with pytest.raises(ValueError, match="does not match the model: missing .*unexpected"):
        C.load_checkpoint(path, model=MLP(3, hidden=8, depth=2, emb_dim=4))
    with pytest.raises(ValueError, match="holds no optimiser state"):
        C.load_checkpoint(path, model=net, optimizer=opt)
    with pytest.raises(ValueError, match="no state for generator 'train'"):
        C.load_checkpoint(path, model=net, generators={"train": gen})
    with pytest.raises(ValueError, match="holds no 'ema' weights"):
        C.checkpoint_weights(path, "ema")
    with pytest.raises(ValueError, match="which must be"):
        C.checkpoint_weights(path, "best")
    with pytest.raises(FileNotFoundError):
        C.read_checkpoint(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a scoresde checkpoint"):
        C.read_checkpoint(tmp_path / "other.safetensors")


def test_ema_update_count_and_grad_scaler_round_trip(tmp_path, gen):
    """The warm-up EMA's position (its update count) and an fp16 GradScaler's scale and growth tracker come
    back exactly; a checkpoint from before update counts (a constant decay) counts one update per step."""
    from functools import partial

    from safetensors.torch import save as st_save

    from scoresde.learning.networks import power_decay

    net, ema, opt = _trained(gen)
    ema.updates = 7
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    scaler.scale(torch.ones(()))  # the scale and growth tracker exist from the first scaled loss on
    scaler.update(2.0**7)
    scaler._growth_tracker.fill_(3)
    path = tmp_path / "c.safetensors"
    C.save_checkpoint(path, model=net, ema=ema, step=3, scaler=scaler)
    ema2 = EMA(net, partial(power_decay, gamma=1.0, power=0.75))
    scaler2 = torch.amp.GradScaler("cpu", growth_interval=5)
    C.load_checkpoint(path, model=net, ema=ema2, scaler=scaler2)
    assert ema2.updates == 7 and scaler2.state_dict() == scaler.state_dict()
    assert scaler2.get_scale() == 2.0**7 and scaler2.state_dict()["_growth_tracker"] == 3
    C.save_checkpoint(tmp_path / "fp32.safetensors", model=net, step=1)
    with pytest.raises(ValueError, match="holds no GradScaler state"):
        C.load_checkpoint(tmp_path / "fp32.safetensors", model=net, scaler=scaler2)
    C.load_checkpoint(path, model=net, scaler=torch.amp.GradScaler("cpu", enabled=False))  # fp32/bf16: no scaler
    tensors, meta = C.read_checkpoint(path)
    old = tmp_path / "old.safetensors"
    old.write_bytes(st_save(tensors, metadata={k: v for k, v in meta.items() if k not in ("ema", "scaler")}))
    C.load_checkpoint(old, model=net, ema=ema2)
    assert ema2.updates == 3
