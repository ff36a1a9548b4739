"""Image folders read with Pillow (running.images), in memory and lazily, and training on them."""
import numpy as np
import pytest
import torch
from PIL import Image

from scoresde.evaluation.metrics import w2_report
from scoresde.running import images
from scoresde.running.data import load_dataset, take_batch
from scoresde.running.images import ImageFolder, LazyImages
from scoresde.running.train import Trainer

rng = np.random.default_rng(0)
GREY_WIDE = rng.integers(0, 256, (4, 8), dtype=np.uint8)       # (H, W): 8 wide, 4 high
RGB_WIDE = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
GREY_SQUARE = rng.integers(0, 256, (8, 8), dtype=np.uint8)
RGB_SQUARE = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)


def scaled(a: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) -> (C, H, W): v / 127.5 - 1 in float32."""
    a = a.astype(np.float32) / np.float32(127.5) - np.float32(1)
    return torch.from_numpy(np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))


@pytest.fixture
def classes(tmp_path):
    """Two class folders of PNG and JPEG images, grey and RGB, two sizes, and a file that is not an image."""
    for name in ("a_cat", "b_dog"):
        (tmp_path / name).mkdir()
    Image.fromarray(RGB_SQUARE).save(tmp_path / "a_cat" / "c1.jpg", quality=95)
    Image.fromarray(GREY_WIDE).save(tmp_path / "a_cat" / "g0.png")
    Image.fromarray(RGB_WIDE).save(tmp_path / "b_dog" / "c2.PNG")
    Image.fromarray(GREY_SQUARE).save(tmp_path / "b_dog" / "g3.png")
    (tmp_path / "b_dog" / "notes.txt").write_text("skipped")
    return tmp_path


def read_all(folder: ImageFolder) -> torch.Tensor:
    return torch.stack([folder[i] for i in range(len(folder))])


def test_resize_crop_labels_and_channels(classes):
    f = ImageFolder(classes, image_size=4)
    assert [p.name for p in f.files] == ["c1.jpg", "g0.png", "c2.PNG", "g3.png"]  # notes.txt skipped
    assert f.classes == ("a_cat", "b_dog") and torch.equal(f.labels, torch.tensor([0, 0, 1, 1]))
    assert f.shape == (3, 4, 4) and len(f) == 4  # one RGB image makes every image RGB
    x = read_all(f)
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float32
    # 8 x 4 images: the shorter side is already 4, so only the central 4 columns are kept
    assert torch.equal(x[1], scaled(GREY_WIDE[:, 2:6]).expand(3, 4, 4))
    assert torch.equal(x[2], scaled(RGB_WIDE[:, 2:6]))
    # 8 x 8 images: resized to 4 x 4 by Pillow's bicubic filter (the JPEG as Pillow decodes it)
    for i, file in ((0, "a_cat/c1.jpg"), (3, "b_dog/g3.png")):
        want = np.asarray(Image.open(classes / file).convert("RGB").resize((4, 4), Image.Resampling.BICUBIC))
        assert torch.equal(x[i], scaled(want))
    # channels=1: colour becomes ITU-R 601-2 luma (Pillow rounds it to whole grey levels)
    grey = ImageFolder(classes, image_size=4, channels=1)
    luma = RGB_WIDE[:, 2:6].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert grey.shape == (1, 4, 4)
    np.testing.assert_allclose(grey[2][0].numpy(), luma / 127.5 - 1, atol=1 / 127.5 + 1e-6)


def test_a_grey_folder_without_classes_keeps_its_size(tmp_path):
    for i in range(3):
        Image.fromarray(np.roll(GREY_WIDE, i)).save(tmp_path / f"{i}.png")
    f = ImageFolder(tmp_path)
    assert f.shape == (1, 4, 8) and f.labels is None and f.classes == ()
    assert torch.equal(read_all(f), torch.stack([scaled(np.roll(GREY_WIDE, i)) for i in range(3)]))
    d = load_dataset(str(tmp_path), n_test=1)
    assert d.is_image and d.train.shape == (2, 1, 4, 8) and d.train_labels is None


def test_bad_folders_are_refused_naming_the_file(classes, tmp_path):
    with pytest.raises(ValueError, match=r"images differ in size: c1.jpg is 8x8, g0.png is 8x4 \(width x height\); "
                                         r"set image_size"):
        ImageFolder(classes)
    (classes / "b_dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image '.*b_dog/bad.png'"):
        ImageFolder(classes, image_size=4)
    (classes / "b_dog" / "bad.png").unlink()
    (classes / "c_empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*c_empty' holds no images \(.png, .jpg"):
        ImageFolder(classes, image_size=4)
    (classes / "c_empty").rmdir()
    Image.fromarray(GREY_WIDE).save(classes / "stray.png")
    with pytest.raises(ValueError, match="holds both images .stray.png. and sub-folders .a_cat."):
        ImageFolder(classes, image_size=4)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match="folder '.*nothing' holds no images"):
        load_dataset(str(empty))
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(GREY_SQUARE.astype(np.uint16) * 256).save(deep / "d.png")
    with pytest.raises(ValueError, match=r"d.png' has mode I;16 .* convert it to 8 bits"):
        ImageFolder(deep)
    with pytest.raises(ValueError, match="channels must be one of 0, 1, 3, got 2"):
        ImageFolder(deep, channels=2)
    with pytest.raises(ValueError, match="image_size and channels apply to image folders only"):
        load_dataset("digits", image_size=16)


def truncated_png(path, a):
    Image.fromarray(a).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # the header reads, the pixels do not


def test_a_file_whose_pixels_do_not_read_is_named_in_memory_and_lazily(tmp_path):
    for i in range(9):
        Image.fromarray(np.roll(RGB_SQUARE, i)).save(tmp_path / f"{i}.png")
    truncated_png(tmp_path / "9.png", RGB_SQUARE)
    with pytest.raises(ValueError, match=r"cannot read image '.*9.png': image file is truncated"):
        load_dataset(str(tmp_path), n_test=1)
    # read lazily, the folder loads without decoding its training images; the bad one is named when read
    lazy = load_dataset(str(tmp_path), n_test=1, seed=0, memory_mb=0, workers=0)
    at = int((lazy.train.rows == 9).nonzero())  # the truncated file is a training image with this seed
    with pytest.raises(ValueError, match=r"cannot read image '.*9.png': image file is truncated"):
        lazy.train[at]
    f = ImageFolder(tmp_path)
    for workers in (0, 2):
        view = LazyImages(f, torch.arange(10), workers)
        assert torch.equal(view[torch.tensor([1, 0])], torch.stack([scaled(np.roll(RGB_SQUARE, i)) for i in (1, 0)]))
        with pytest.raises(ValueError, match=r"cannot read image '.*9.png': image file is truncated"):
            view[torch.tensor([2, 9, 3])]


def test_lazy_and_in_memory_reads_are_identical(classes, monkeypatch):
    for i in range(12):  # more images, so that the held-out set and the training set are both several
        Image.fromarray(np.roll(RGB_SQUARE, i, axis=1)).save(classes / "b_dog" / f"r{i:02d}.jpg")
    mem = load_dataset(str(classes), n_test=3, seed=5, image_size=4)
    assert isinstance(mem.train, torch.Tensor) and mem.train.shape == (13, 3, 4, 4) and mem.test.shape == (3, 3, 4, 4)
    assert mem.classes == ("a_cat", "b_dog")
    whole = read_all(ImageFolder(classes, image_size=4))  # the held-out rows are rows of the folder, none left out
    rows = {tuple(r) for r in whole.flatten(1).tolist()}
    assert {tuple(r) for r in torch.cat([mem.train, mem.test]).flatten(1).tolist()} == rows
    idx = torch.tensor([12, 0, 5, 5, 7, 1])
    for workers in (0, 2):
        lazy = load_dataset(str(classes), n_test=3, seed=5, image_size=4, memory_mb=0, workers=workers)
        assert isinstance(lazy.train, LazyImages) and lazy.train.shape == mem.train.shape and lazy.is_image
        assert torch.equal(lazy.test, mem.test) and torch.equal(lazy.train_labels, mem.train_labels)
        assert torch.equal(lazy.test_labels, mem.test_labels)
        assert torch.equal(lazy.train[idx], mem.train[idx]) and torch.equal(lazy.train[3], mem.train[3])
        assert torch.equal(lazy.train[2:9], mem.train[2:9])
        lazy.train.prefetch(idx.flip(0))  # a read-ahead of other rows does not change what is read
        assert torch.equal(lazy.train[idx], mem.train[idx])
        a, b = (w2_report(mem.test, d, generator=torch.Generator().manual_seed(0)) for d in (mem, lazy))
        assert a == b
    monkeypatch.setattr(images, "CHUNK", 2)  # 7 worker tasks for 13 images, more than the DataLoader keeps in flight
    assert torch.equal(load_dataset(str(classes), n_test=3, seed=5, image_size=4, memory_mb=0).train[:], mem.train)


def test_hflip_mirrors_about_half_the_images_reproducibly(tmp_path):
    x = torch.randn(50, 2, 3, 5)
    idx = torch.randint(50, (400,), generator=torch.Generator().manual_seed(1))
    out = take_batch(x, idx, slice(None), torch.Generator().manual_seed(7), hflip=True)
    same = (out == x[idx]).flatten(1).all(1)
    mirrored = (out == x[idx].flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()  # each image is itself or its mirror (never both: random pixels)
    assert 150 < mirrored.sum() < 250  # 400 fair coins: mean 200, sd 10
    assert torch.equal(out, take_batch(x, idx, slice(None), torch.Generator().manual_seed(7), hflip=True))
    assert not torch.equal(out, take_batch(x, idx, slice(None), torch.Generator().manual_seed(8), hflip=True))
    # a process's slice of the batch gets the same coins as in the whole batch
    assert torch.equal(take_batch(x, idx, slice(100, 200), torch.Generator().manual_seed(7), hflip=True), out[100:200])
    assert torch.equal(take_batch(x, idx, slice(None), torch.Generator().manual_seed(7)), x[idx])
    with pytest.raises(ValueError, match=r"hflip mirrors images; this data has samples of shape \(4,\)"):
        take_batch(torch.zeros(5, 4), idx[:3] % 5, slice(None), torch.Generator(), hflip=True)


def _weights(tr):
    return {**tr.model.state_dict(), **{f"ema/{k}": v for k, v in tr.ema.shadow.items()}}


def test_training_on_a_lazy_folder_is_bit_identical_to_in_memory_and_resumes_exactly(tmp_path, tiny_config):
    folder = tmp_path / "images"
    for c in ("x", "y"):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.roll(RGB_SQUARE, 3 * i + (c == "y"), axis=0)).save(folder / c / f"{i}.png")
    cfg = {"data": str(folder), "image_size": 8, "hflip": True, "n_test": 4, "net": "unet",
           "net_args": {"base": 8, "mults": [1, 2]}, "steps": 6, "batch_size": 4, "checkpoint_every": 3}
    mem = Trainer(tiny_config(name="mem", **cfg)).run()
    assert isinstance(mem.train_x, torch.Tensor)
    lazy = Trainer(tiny_config(name="lazy", data_memory_mb=0, **cfg)).run()
    assert isinstance(lazy.train_x, LazyImages)
    a, b = _weights(mem), _weights(lazy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    Trainer(tiny_config(name="cut", data_memory_mb=0, **cfg)).run(until=5)  # killed after step 5, checkpoint at 3
    resumed = Trainer(tiny_config(name="cut", data_memory_mb=0, data_workers=1, **cfg))
    assert resumed.step == 3
    c = _weights(resumed.run())
    assert all(torch.equal(a[k], c[k]) for k in a)
