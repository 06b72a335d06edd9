"""Trainer data: CIFAR pickle folders and their checks, batch augmentation, training streams."""
import pickle
import runpy
import sys

import numpy as np
import pytest
import torch

from cifar_folder import random_cifar, write_batch, write_cifar10, write_cifar100
from fused_preact.train.augment import BatchAugment
from fused_preact.train.data import DatasetError, ImageSet, channel_stats, load_cifar
from fused_preact.train.streams import DeviceStream


def _random_images(rng, n):
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


# -- loading -------------------------------------------------------------------------
def test_cifar10_folder_loads_every_image_and_label(tmp_path):
    rng = np.random.default_rng(1)
    train, test = _random_images(rng, 23), _random_images(rng, 7)
    write_cifar10(tmp_path, *train, *test)
    loaded_train, loaded_test = load_cifar(tmp_path, "cifar10")
    assert torch.equal(loaded_train.images, torch.from_numpy(train[0]))
    assert torch.equal(loaded_train.labels, torch.from_numpy(train[1]))
    assert torch.equal(loaded_test.images, torch.from_numpy(test[0]))
    assert loaded_test.labels.tolist() == test[1].tolist()


def test_cifar100_folder_loads_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (11, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 100, 11)
    folder = write_cifar100(tmp_path, images, labels, images[:5], labels[:5])
    train, test = load_cifar(folder, "cifar100")     # --data may also name the pickle folder itself
    assert torch.equal(train.images, torch.from_numpy(images))
    assert train.labels.tolist() == labels.tolist() and len(test) == 5


def _corrupt(name):
    def garbage(folder):
        (folder / "data_batch_3").write_bytes(b"\x80\x02garbage that is no pickle")

    def missing(folder):
        (folder / "test_batch").unlink()

    def wrong_key(folder):
        entry = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
        entry[b"fine_labels"] = entry.pop(b"labels")
        (folder / "data_batch_1").write_bytes(pickle.dumps(entry))

    def wrong_shape(folder):
        entry = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="bytes")
        entry[b"data"] = entry[b"data"][:, :1024]
        (folder / "data_batch_2").write_bytes(pickle.dumps(entry))

    def bad_label(folder):
        entry = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
        entry[b"labels"][0] = 10
        (folder / "test_batch").write_bytes(pickle.dumps(entry))

    def no_folder(folder):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()

    return {"garbage": (garbage, "data_batch_3 is not a readable pickle"),
            "missing": (missing, "missing: test_batch"),
            "wrong_key": (wrong_key, "data_batch_1 has no key b'labels'"),
            "wrong_shape": (wrong_shape, "data_batch_2: b'data' must be a uint8 array of shape (n, 3072)"),
            "bad_label": (bad_label, "test_batch: labels must lie in [0, 10)"),
            "no_folder": (no_folder, "that folder does not exist")}[name]


@pytest.mark.parametrize("problem", ["garbage", "missing", "wrong_key", "wrong_shape", "bad_label", "no_folder"])
def test_bad_cifar_folder_raises_one_clear_error(tmp_path, problem):
    folder = random_cifar(tmp_path, 20, 10)
    damage, message = _corrupt(problem)
    damage(folder)
    with pytest.raises(DatasetError) as error:
        load_cifar(tmp_path, "cifar10")
    text = str(error.value)
    assert text.startswith(f"CIFAR-10: expected the python-pickle folder {str(folder)!r}")
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta" in text
    assert message in text


def test_file_with_official_count_is_checked_against_published_md5(tmp_path):
    folder = random_cifar(tmp_path, 20, 10)
    rng = np.random.default_rng(3)
    # a batch of 10,000 images claims to be the official file, so its md5 sum is checked
    write_batch(folder / "data_batch_1", rng.integers(0, 256, (10000, 3, 32, 32), dtype=np.uint8),
                rng.integers(0, 10, 10000))
    with pytest.raises(DatasetError, match="data_batch_1 holds the official 10000 images but its md5 sum "
                                           "is not the published c99cafc152244af753f735de768cd75f"):
        load_cifar(tmp_path, "cifar10")
    train, _ = load_cifar(tmp_path, "cifar10", verify_md5=False)
    assert len(train) == 10000 + 16


def test_command_line_reports_a_missing_folder_in_one_line(tmp_path, monkeypatch, capsys):
    argv = ["fused_preact.train", "--data", str(tmp_path / "nowhere"), "--dataset", "cifar100", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("fused_preact.train", run_name="__main__")
    assert exit_.value.code == 2     # refused before anything ran (the exit statuses: --help)
    assert capsys.readouterr().err == (
        f"error: CIFAR-100: expected the python-pickle folder {str(tmp_path / 'nowhere' / 'cifar-100-python')!r} "
        f"(extracted from cifar-100-python.tar.gz) holding train, test, meta; that folder does not exist "
        f"(nothing is downloaded: extract the archive under --data)\n")
    assert not (tmp_path / "run").exists()     # nothing left behind


# -- augmentation --------------------------------------------------------------------
def _reference_augment(images, params, pad, mean, std):
    """Per-image numpy pad, crop, flip and normalize, in float64."""
    n, c, h, w = images.shape
    out = np.empty(images.shape, dtype=np.float64)
    for i in range(n):
        padded = np.pad(images[i].astype(np.float64), ((0, 0), (pad, pad), (pad, pad)))
        t, l = int(params.top[i]), int(params.left[i])
        crop = padded[:, t:t + h, l:l + w]
        if params.flip[i]:
            crop = crop[:, :, ::-1]
        out[i] = (crop / 255 - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    return out


@pytest.mark.parametrize("pad, shape", [(4, (7, 3, 32, 32)), (3, (5, 3, 9, 13)), (0, (3, 3, 6, 6))])
def test_batch_augmentation_matches_per_image_reference(pad, shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    augment = BatchAugment(mean, std, pad=pad, flip=True)
    params = augment.draw(shape[0], torch.Generator().manual_seed(5))
    assert params.top.min() >= 0 and params.top.max() <= 2 * pad and params.left.max() <= 2 * pad
    out = augment(images, params)
    assert out.dtype == torch.float32 and out.shape == shape
    expected = _reference_augment(images.numpy(), params, pad, mean, std)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_augmentation_draws_every_offset_and_both_flips():
    params = BatchAugment((0.5,) * 3, (0.25,) * 3, pad=4).draw(4000, torch.Generator().manual_seed(0))
    assert set(params.top.tolist()) == set(range(9)) == set(params.left.tolist())
    assert 0.45 < params.flip.float().mean().item() < 0.55


def test_augmentation_rejects_float_images():
    with pytest.raises(ValueError, match="images must be uint8"):
        BatchAugment((0.5,) * 3, (0.25,) * 3)(torch.rand(2, 3, 8, 8))


def test_channel_stats_match_float64_reference():
    images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=8)
    x = images.double().numpy() / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-9)


# -- streams ---------------------------------------------------------------------------
def _stream(data, rank=0, world_size=1, batch=6):
    augment = BatchAugment((0.4, 0.5, 0.6), (0.2, 0.3, 0.25), pad=2)
    return DeviceStream(data, augment, batch, seed=11, rank=rank, world_size=world_size)


def test_processes_see_slices_of_the_single_process_batches():
    data = ImageSet(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (20,)))
    single, ranks = _stream(data), [_stream(data, r, 2) for r in range(2)]
    for _ in range(7):     # over two epochs (3 batches each)
        x, y = single.next()
        parts = [s.next() for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert single.batches_per_epoch == 3


def test_stream_state_resumes_the_same_batches_mid_epoch():
    data = ImageSet(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (20,)))
    stream = _stream(data)
    for _ in range(4):
        stream.next()
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    expected = [stream.next() for _ in range(4)]
    resumed = _stream(data)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next() for _ in range(4))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_stream_rejects_batch_not_divisible_by_processes():
    data = ImageSet(torch.zeros(20, 3, 8, 8, dtype=torch.uint8), torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size 6 .* divisible by the number of processes, 4"):
        _stream(data, 0, 4)
