import json
import os

import pytest
import torch
from safetensors import safe_open

from scoresde.core.errors import DamagedFileError
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
    net, _, opt = _trained(gen)
    path = tmp_path / "c.safetensors"
    C.save_checkpoint(path, model=net, step=1)
    with pytest.raises(ValueError, match="does not match the model .*: missing blocks.1.* shape mismatch "
                                         "inp.weight \\(8, 2\\) vs \\(8, 3\\)"):
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

    net, ema, _ = _trained(gen)
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
    old.write_bytes(st_save(tensors, metadata={k: v for k, v in meta.items() if k not in ("ema", "scaler", "checksum")}))
    C.load_checkpoint(old, model=net, ema=ema2)
    assert ema2.updates == 3


# --- issue 18: the last two kept, damage detected, fallback, kill safety -------------------------------------

def _net(step: int) -> MLP:
    """A small net whose weights depend on `step`."""
    torch.manual_seed(step)
    net = MLP(2, hidden=8, depth=1, emb_dim=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def _saved(path, steps) -> dict[int, dict[str, torch.Tensor]]:
    """Save _net(s) at each step in turn; the weights of each, copied at save time."""
    copies = {}
    for s in steps:
        net = _net(s)
        C.save_checkpoint(path, model=net, step=s)
        copies[s] = {k: v.clone() for k, v in net.state_dict().items()}
    return copies


def _loaded(path) -> tuple[int, dict[str, torch.Tensor]]:
    net = MLP(2, hidden=8, depth=1, emb_dim=4)
    step, _ = C.load_checkpoint(path, model=net, restore_global_rng=False)
    return step, net.state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _data_start(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_keeps_the_last_two_and_removes_both(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    copies = _saved(path, (1, 2, 3))
    prev = C.previous_checkpoint(path)
    assert prev == tmp_path / "checkpoint.prev.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.safetensors", "checkpoint.safetensors"]
    for file, step in ((path, 3), (prev, 2)):
        assert C.read_checkpoint(file)[1]["step"] == str(step) and _same(C.checkpoint_weights(file, "model"), copies[step])
    assert C.has_checkpoint(path)
    (tmp_path / ".checkpoint.safetensors.abc.tmp").write_bytes(b"debris of a killed save")
    C.remove_checkpoints(path)
    assert os.listdir(tmp_path) == [] and not C.has_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at '{path}'"):
        C.load_checkpoint(path, model=_net(0))
    with pytest.raises(OSError, match="is a folder"):
        C.save_checkpoint(tmp_path, model=_net(0), step=1)


def _truncate(at):
    return lambda b, n: b[:at(len(b), n)]


def _flip(at):
    return lambda b, n: b[:at(len(b), n)] + bytes([b[at(len(b), n)] ^ 0x01]) + b[at(len(b), n) + 1:]


# damage -> (what it does to the file's bytes given the data section's start n, words of the reason)
DAMAGE = {
    "truncated in the length prefix": (_truncate(lambda size, n: 5), "too short"),
    "truncated in the header": (_truncate(lambda size, n: n // 2), "header length"),
    "truncated in the data": (_truncate(lambda size, n: (size + n) // 2), "truncated"),
    "last byte missing": (_truncate(lambda size, n: size - 1), "truncated"),
    "one byte appended": (lambda b, n: b + b"\0", "1 bytes beyond"),
    "one data byte flipped": (_flip(lambda size, n: (size + n) // 2), "checksum mismatch"),
    "last data byte flipped": (_flip(lambda size, n: size - 1), "checksum mismatch"),
    "header brace removed": (lambda b, n: b[:8] + b" " + b[9:], "unparsable safetensors header"),
    "random bytes": (lambda b, n: torch.randint(256, (len(b),), generator=torch.Generator().manual_seed(0),
                                                dtype=torch.uint8).numpy().tobytes(), "not a safetensors file"),
    "empty file": (lambda b, n: b"", "empty file"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_is_detected_and_the_previous_checkpoint_used(tmp_path, damage):
    path = tmp_path / "checkpoint.safetensors"
    copies = _saved(path, (1, 2))
    change, reason = DAMAGE[damage]
    path.write_bytes(change(path.read_bytes(), _data_start(path)))
    prev = C.previous_checkpoint(path)
    notice = f"checkpoint {path} is damaged \\(.*{reason}.*\\); using the previous one {prev} \\(step 1\\)"
    with pytest.warns(UserWarning, match=notice):
        step, weights = _loaded(path)
    assert step == 1 and _same(weights, copies[1])
    with pytest.warns(UserWarning, match=notice):
        assert _same(C.checkpoint_weights(path, "model"), copies[1])
    with pytest.warns(UserWarning, match=notice):
        assert C.read_checkpoint(path)[1]["step"] == "1"
    # the previous one damaged too: an error naming both
    prev.write_bytes(prev.read_bytes()[:-3])
    with pytest.raises(DamagedFileError, match=f"no intact checkpoint: {path} is damaged \\(.*{reason}.*\\); "
                                                  f"{prev} is damaged \\(truncated"):
        C.read_checkpoint(path)
    # no previous one: an error naming the file, in one line
    prev.unlink()
    with pytest.raises(DamagedFileError, match=f"{path} is not a usable checkpoint: .*{reason}") as err:
        C.load_checkpoint(path, model=_net(0))
    assert "\n" not in str(err.value)


def test_a_header_edit_is_detected_by_the_checksum(tmp_path):
    """A change to the metadata that keeps the header valid JSON (the step 2 -> 7) is caught too."""
    path = tmp_path / "checkpoint.safetensors"
    _saved(path, (1, 2))
    data = path.read_bytes()
    assert data.count(b'"step":"2"') == 1
    path.write_bytes(data.replace(b'"step":"2"', b'"step":"7"'))
    with pytest.warns(UserWarning, match="checksum mismatch.*; using the previous one .* \\(step 1\\)"):
        assert _loaded(path)[0] == 1


def test_missing_newest_falls_back_and_damaged_newest_is_not_kept(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    copies = _saved(path, (1, 2))
    prev = C.previous_checkpoint(path)
    path.unlink()  # as a kill between the two renames of a save leaves it
    assert C.has_checkpoint(path)
    with pytest.warns(UserWarning, match=f"checkpoint {path} is missing; using the previous one {prev} \\(step 1\\)"):
        assert C.load_weights(path, _net(0), "model") == 1
    prev.write_bytes(b"")
    with pytest.raises(DamagedFileError, match=f"no intact checkpoint: {path} is missing; {prev} is damaged \\(empty"):
        C.load_weights(path, _net(0), "model")
    # a damaged newest one is overwritten, not kept as the previous one
    C.remove_checkpoints(path)
    copies = _saved(path, (1, 2))
    path.write_bytes(path.read_bytes()[:100])
    copies.update(_saved(path, (3,)))
    assert _same(_loaded(path)[1], copies[3])
    path.unlink()
    with pytest.warns(UserWarning, match="\\(step 1\\)"):
        assert _same(_loaded(path)[1], copies[1])


def test_not_a_checkpoint_gives_one_line_naming_it(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for path, reason in ((other, "not a scoresde checkpoint: format None"), (folder, "a folder")):
        with pytest.raises(ValueError, match=f"{path} is not a usable checkpoint: {reason}") as err:
            C.read_checkpoint(path)
        assert "\n" not in str(err.value)


def test_checkpoint_without_checksum_loads_unverified(tmp_path):
    """Files written before the checksum existed load; nothing is verified beyond their structure."""
    from safetensors.torch import save as st_save

    path = tmp_path / "checkpoint.safetensors"
    copies = _saved(path, (5,))
    tensors, meta = C.read_checkpoint(path)
    path.write_bytes(st_save(tensors, metadata={k: v for k, v in meta.items() if k != "checksum"}))
    step, weights = _loaded(path)
    assert step == 5 and _same(weights, copies[5])
    data = path.read_bytes()
    at = len(data) - 1
    path.write_bytes(data[:at] + bytes([data[at] ^ 1]))
    assert _loaded(path)[0] == 5  # not detectable without a checksum


def test_mismatch_names_the_net_args_that_differ(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    args = {"hidden": 32, "depth": 1, "emb_dim": 4, "mult": [1, 2]}
    C.save_checkpoint(path, model=MLP(2, hidden=32, depth=1, emb_dim=4), step=1,
                      extra={"data": "moons", "net": "mlp", "net_args": args})
    model = MLP(2, hidden=64, depth=1, emb_dim=4)
    own = {**args, "hidden": 64, "mult": (1, 2)}  # a tuple equals the list it was saved as
    with pytest.raises(ValueError, match="(?m)saved from another network: net_args.hidden 32 vs 64 \\(checkpoint vs "
                                         "model\\)$") as err:
        C.load_checkpoint(path, model=model, net="mlp", net_args=own)
    assert len(str(err.value).splitlines()) == 2
    with pytest.raises(ValueError, match="net 'mlp' vs 'unet'; net_args.depth 1 vs unset; net_args.hidden 32 vs 64"):
        C.load_weights(path, model, "model", net="unet", net_args={k: v for k, v in own.items() if k != "depth"})
    # without the caller's config: the first mismatching tensors with both shapes (nn.Linear(h, h).weight is (h, h))
    with pytest.raises(ValueError, match="shape mismatch .*blocks.0.emb.weight \\(32, 32\\) vs \\(64, 64\\).*more\\)$") as err:
        C.load_weights(path, model, "model")
    assert "\n" not in str(err.value)


KILL_SCRIPT = r"""
import json, os, signal, sys
import torch
from torch import nn
from scoresde.running import checkpoint as C

torch.set_num_threads(1)
real = {"replace": os.replace, "fsync": os.fsync}


def net(step):
    m = nn.Linear(3, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(step)
    return m


def arm(kill_at, when, calls):
    def wrap(name):
        def call(*args):
            calls.append(name)
            if len(calls) == kill_at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real[name](*args)
            if len(calls) == kill_at and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return call
    os.replace, os.fsync = wrap("replace"), wrap("fsync")


calls = []  # the os.replace / os.fsync calls of one save that replaces a checkpoint
arm(0, "never", calls)
C.save_checkpoint(os.path.join(sys.argv[1], "count.safetensors"), model=net(1), step=1)
C.save_checkpoint(os.path.join(sys.argv[1], "count.safetensors"), model=net(2), step=2)
os.replace, os.fsync = real["replace"], real["fsync"]
n = len(calls) // 2
results = []
for last in (2, 3):  # kill the second save (one checkpoint before) or the third (two before)
    for k in range(1, n + 1):
        for when in ("before", "after"):
            folder = os.path.join(sys.argv[1], f"{last}-{k}-{when}")
            os.mkdir(folder)
            pid = os.fork()
            if pid == 0:
                for step in range(1, last + 1):
                    if step == last:
                        arm(k, when, [])
                    C.save_checkpoint(os.path.join(folder, "checkpoint.safetensors"), model=net(step), step=step)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            results.append([folder, last, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL])
print(json.dumps({"calls": calls[:n], "results": results}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the child forks one process per kill point")
def test_a_save_killed_at_any_rename_or_fsync_leaves_an_intact_checkpoint(tmp_path):
    import subprocess
    import sys
    import warnings

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=False, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["calls"].count("replace") >= 2 and "fsync" in report["calls"]  # write, rename(s), folder sync
    steps = set()
    for folder, last, killed in report["results"]:
        assert killed, folder
        path = os.path.join(folder, "checkpoint.safetensors")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            tensors, meta = C.read_checkpoint(path)
        step = int(meta["step"])
        assert step in (last - 1, last), folder
        assert torch.equal(tensors["model/weight"], torch.full((2, 3), float(step)))
        steps.add((last, step))
    assert steps == {(2, 1), (2, 2), (3, 2), (3, 3)}  # killed before the save counts, and after it


def test_a_save_clears_what_saves_killed_mid_write_left(tmp_path, gen):
    net, ema, opt = _trained(gen)
    path = tmp_path / "checkpoint.safetensors"
    debris = [tmp_path / "..checkpoint.safetensors.new.abc123.tmp", tmp_path / ".checkpoint.safetensors.xyz.tmp"]
    for p in debris:
        p.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.safetensors.q.tmp"
    other.write_bytes(b"not ours")
    C.save_checkpoint(path, model=net, step=1)
    assert not any(p.exists() for p in debris) and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.safetensors.q.tmp", "checkpoint.safetensors"]
