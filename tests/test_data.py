"""Tests of landscape.data: file formats, checksums, splits, subsets, noise, loader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import pickle
import socket
import struct
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape import data
from landscape.data import Augment, Loader, load_dataset
from landscape.utils import UserError

MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(autouse=True)
def no_system_datasets(monkeypatch, tmp_path):
    """The system location (``/usr/share/datasets``) is an empty per-test folder; the
    tests of the real Debian files set it back to ``REAL_SYSTEM_ROOT``."""
    monkeypatch.setattr(data, "SYSTEM_DATA_ROOT", tmp_path / "system-datasets")


REAL_SYSTEM_ROOT = Path("/usr/share/datasets")
needs_debian_fashion_mnist = pytest.mark.skipif(
    not (REAL_SYSTEM_ROOT / "fashion-mnist").is_dir(),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


# ------------------------------------------------------------------- file generators


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dims = struct.pack(f">{arr.ndim}I", *arr.shape)
    return bytes([0, 0, code, arr.ndim]) + dims + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_gz(path: Path, payload: bytes, level: int = 9) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, compresslevel=level))


def write_idx(folder: Path, arrays: dict[str, np.ndarray], how: str) -> None:
    """Write ``arrays`` (keyed by official ``.gz`` name) as IDX files in ``folder``:
    ``"gz"`` gzipped at level 1 (not make_mnist's 9: other .gz bytes, same content),
    ``"plain"`` uncompressed under the name without ``.gz``."""
    for f, a in arrays.items():
        if how == "gz":
            write_gz(folder / f, idx_bytes(a), level=1)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f.removesuffix(".gz")).write_bytes(idx_bytes(a))


def trust_content(monkeypatch, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Point the content-digest table of ``name`` at the IDX content of ``arrays``."""
    for f, a in arrays.items():
        digest = hashlib.sha256(idx_bytes(a)).hexdigest()
        monkeypatch.setitem(data.SOURCES[name].sha256, f, digest)


def trust(monkeypatch, name: str, folder: Path) -> None:
    """Point the checksum table of ``name`` at the generated files."""
    for f in data.SOURCES[name].md5:
        if (folder / f).exists():
            monkeypatch.setitem(data.SOURCES[name].md5, f, md5(folder / f))


def make_mnist(root: Path, name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (7, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    for f, a in arrays.items():
        write_gz(root / name / f, idx_bytes(a))
    return arrays


def cifar_tarball(path: Path, members: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, d in members.items():
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def make_cifar10(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    batches = {}
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 2).tolist()
        batches[f"cifar-10-batches-py/data_batch_{i}"] = {
            b"batch_label": b"training batch",
            b"labels": y,
            b"data": x,
        }
        xs.append(x)
        ys += y
    tx = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    ty = rng.integers(0, 10, 3).tolist()
    batches["cifar-10-batches-py/test_batch"] = {b"labels": ty, b"data": tx}
    batches["cifar-10-batches-py/batches.meta"] = {b"label_names": [b"x"] * 10}
    cifar_tarball(root / "cifar10" / "cifar-10-python.tar.gz", batches)
    return np.concatenate(xs), np.array(ys), tx, np.array(ty)


def check_images(ds_x: torch.Tensor, raw: np.ndarray, mean, std) -> None:
    """``ds_x`` is ``raw`` (uint8, NCHW) scaled to [0, 1] and normalised."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    assert ds_x.dtype == torch.float32
    assert ds_x.shape == raw.shape
    expected = torch.from_numpy(raw.astype(np.float32) / 255.0)
    torch.testing.assert_close(ds_x * s + m, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ file formats


@pytest.mark.parametrize(
    ("name", "mean", "std"), [("mnist", 0.1307, 0.3081), ("fashion-mnist", 0.2860, 0.3530)]
)
def test_mnist_formats(tmp_path, monkeypatch, name, mean, std):
    arrays = make_mnist(tmp_path, name, np.random.default_rng(0))
    trust(monkeypatch, name, tmp_path / name)
    ds = load_dataset(name, tmp_path, download=False)
    assert (ds.mean, ds.std, ds.num_classes, ds.augment) == ((mean,), (std,), 10, "none")
    check_images(ds.train_x, arrays["train-images-idx3-ubyte.gz"][:, None], (mean,), (std,))
    check_images(ds.test_x, arrays["t10k-images-idx3-ubyte.gz"][:, None], (mean,), (std,))
    assert ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert (ds.in_channels, ds.shape) == (1, (1, 5, 4))


def test_cifar10_format(tmp_path, monkeypatch):
    x, y, tx, ty = make_cifar10(tmp_path, np.random.default_rng(1))
    trust(monkeypatch, "cifar10", tmp_path / "cifar10")
    ds = load_dataset("cifar10", tmp_path, download=False)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    assert (ds.mean, ds.std, ds.num_classes, ds.augment) == (mean, std, 10, "cifar")
    # each row is 1024 red, 1024 green, 1024 blue values, row-major 32x32
    check_images(ds.train_x, x.reshape(-1, 3, 32, 32), mean, std)
    check_images(ds.test_x, tx.reshape(-1, 3, 32, 32), mean, std)
    raw = lambda t, i, c, h, w: t[i, c, h, w].item() * std[c] + mean[c]  # noqa: E731
    assert raw(ds.train_x, 3, 1, 2, 5) == pytest.approx(x[3, 1024 + 2 * 32 + 5] / 255)
    assert raw(ds.train_x, 0, 0, 0, 0) == pytest.approx(x[0, 0] / 255)
    assert raw(ds.test_x, 2, 2, 31, 31) == pytest.approx(tx[2, 3071] / 255)
    assert ds.train_y.tolist() == y.tolist()  # batches 1..5 in order
    assert ds.test_y.tolist() == ty.tolist()
    assert (ds.in_channels, ds.image_size) == (3, 32)


def test_cifar100_format(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    tx = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    fine, tfine = [99, 0, 57, 12], [3, 98]
    cifar_tarball(
        tmp_path / "cifar100" / "cifar-100-python.tar.gz",
        {
            "cifar-100-python/train": {b"data": x, b"fine_labels": fine, b"coarse_labels": [1] * 4},
            "cifar-100-python/test": {b"data": tx, b"fine_labels": tfine, b"coarse_labels": [2, 2]},
        },
    )
    trust(monkeypatch, "cifar100", tmp_path / "cifar100")
    ds = load_dataset("cifar100", tmp_path, download=False)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    assert (ds.mean, ds.std, ds.num_classes, ds.augment) == (mean, std, 100, "cifar")
    check_images(ds.train_x, x.reshape(-1, 3, 32, 32), mean, std)
    check_images(ds.test_x, tx.reshape(-1, 3, 32, 32), mean, std)
    assert ds.train_y.tolist() == fine
    assert ds.test_y.tolist() == tfine


def test_read_idx_big_endian_types(tmp_path):
    a = np.array([[1, -2, 300], [-32768, 32767, 0]], dtype=np.int16)
    write_gz(tmp_path / "a.gz", idx_bytes(a, code=0x0B))
    out = data.read_idx(tmp_path / "a.gz", ndim=2)
    assert out.dtype == np.int16 and out.tolist() == a.tolist()
    f = np.array([1.5, -2.25], dtype=np.float32)
    write_gz(tmp_path / "f.gz", idx_bytes(f, code=0x0D))
    assert data.read_idx(tmp_path / "f.gz").tolist() == [1.5, -2.25]
    with pytest.raises(UserError, match="expected 3 dimensions"):
        data.read_idx(tmp_path / "a.gz", ndim=3)


# ------------------------------------------------------------------------------ errors


def test_wrong_checksum(tmp_path):
    make_mnist(tmp_path, "mnist", np.random.default_rng(0))
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with pytest.raises(UserError) as e:
        load_dataset("mnist", tmp_path, download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg and md5(bad) in msg


@pytest.mark.parametrize("download", [False, True])
def test_missing_files(tmp_path, monkeypatch, download):
    make_mnist(tmp_path, "mnist", np.random.default_rng(0))
    trust(monkeypatch, "mnist", tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as e:
        load_dataset("mnist", tmp_path, download=download)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(tmp_path / "mnist") in msg
    assert "train-images" not in msg  # only the missing file is named
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in msg
    assert ("network disabled" in msg) == download
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_FILES[:3])


def test_missing_directory_named(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz not found in .*cifar10"):
        load_dataset("cifar10", tmp_path / "nowhere", download=False)


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def test_download_with_mirror_fallback(tmp_path, monkeypatch):
    src = tmp_path / "src"
    arrays = make_mnist(src, "mnist", np.random.default_rng(3))
    trust(monkeypatch, "mnist", src / "mnist")
    first, second = data.SOURCES["mnist"].urls
    requested = []

    def fake_urlopen(request, timeout=None):
        url = request.full_url
        requested.append(url)
        if url.startswith(first):
            raise urllib.error.HTTPError(url, 503, "unavailable", None, None)
        return FakeResponse((src / "mnist" / url.removeprefix(second)).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds = load_dataset("mnist", tmp_path / "root")
    assert len(requested) == 8  # each file: first mirror fails, second serves
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(MNIST_FILES)


def test_download_with_wrong_content_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda r, timeout=None: FakeResponse(b"junk"))
    with pytest.raises(UserError) as e:
        load_dataset("cifar100", tmp_path)
    assert "eb9058c3a382ffc7106e4002c42a8d85" in str(e.value)
    assert list((tmp_path / "cifar100").iterdir()) == []  # no partial file left


def test_corrupt_files(tmp_path, monkeypatch):
    make_mnist(tmp_path, "mnist", np.random.default_rng(0))
    folder = tmp_path / "mnist"
    f = folder / "train-images-idx3-ubyte.gz"
    write_gz(f, gzip.decompress(f.read_bytes())[:-5])  # truncated payload
    trust(monkeypatch, "mnist", folder)
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", tmp_path, download=False)
    f.write_bytes(f.read_bytes()[:20])  # truncated gzip stream
    trust(monkeypatch, "mnist", folder)
    with pytest.raises(UserError, match="corrupt"):
        load_dataset("mnist", tmp_path, download=False)
    write_gz(f, b"\x00\x00\x08\x03" + b"\x00")  # header cut short
    trust(monkeypatch, "mnist", folder)
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", tmp_path, download=False)
    write_gz(f, b"PK\x03\x04" + bytes(100))  # not IDX
    trust(monkeypatch, "mnist", folder)
    with pytest.raises(UserError, match="magic"):
        load_dataset("mnist", tmp_path, download=False)

    tarball = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    make_cifar10(tmp_path, np.random.default_rng(0))
    tarball.write_bytes(tarball.read_bytes()[:300])
    trust(monkeypatch, "cifar10", tmp_path / "cifar10")
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz is corrupt"):
        load_dataset("cifar10", tmp_path, download=False)
    cifar_tarball(tarball, {"cifar-10-batches-py/data_batch_1": {b"data": 1, b"labels": []}})
    trust(monkeypatch, "cifar10", tmp_path / "cifar10")
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", tmp_path, download=False)


def test_bad_arguments():
    with pytest.raises(UserError, match=r"unknown dataset 'cifar11'.*cifar10, cifar100, digits"):
        load_dataset("cifar11")
    with pytest.raises(UserError, match="does not take options"):
        load_dataset("digits", n_train=5)
    for kw in [{"subset": 0}, {"subset": 513}, {"subset": 2.5}, {"label_noise": 1.0}]:
        with pytest.raises(UserError):
            load_dataset("synthetic", **kw)
    with pytest.raises(UserError, match="shape"):
        load_dataset("synthetic", shape=(8, 8))
    with pytest.raises(UserError, match="label_noise"):
        load_dataset("synthetic", label_noise=-0.1)
    with pytest.raises(UserError, match="augmentation"):
        Augment.named("autoaugment")
    with pytest.raises(UserError, match="crop"):
        Augment(crop=-1)
    assert data.dataset_names() == sorted(
        ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic"]
    )


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LANDSCAPE_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv("LANDSCAPE_DATA")
    assert data.default_root() == Path.home() / ".cache" / "landscape"


# ------------------------------------------- local copies: where, content digests, offline


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_recompressed_copy_accepted_by_content(tmp_path, monkeypatch, name):
    arrays = make_mnist(tmp_path / "served", name, np.random.default_rng(5))
    write_idx(tmp_path / "root" / name, arrays, "gz")
    trust_content(monkeypatch, name, arrays)  # the MD5 table stays the official one
    for f in arrays:
        served = (tmp_path / "served" / name / f).read_bytes()
        assert (tmp_path / "root" / name / f).read_bytes() != served  # other .gz bytes
    ds = load_dataset(name, tmp_path / "root", download=False)
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert ds.shape == (1, 5, 4) and len(ds.test_y) == 3


def test_plain_idx_files_accepted(tmp_path, monkeypatch):
    arrays = make_mnist(tmp_path / "unused", "mnist", np.random.default_rng(6))
    write_idx(tmp_path / "mnist", arrays, "plain")
    trust_content(monkeypatch, "mnist", arrays)
    ds = load_dataset("mnist", tmp_path, download=False)
    check_images(ds.train_x, arrays["train-images-idx3-ubyte.gz"][:, None], (0.1307,), (0.3081,))
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    # an uncompressed file under the .gz name is recognised by its content too
    plain = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    plain.rename(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert load_dataset("mnist", tmp_path, download=False).test_y.tolist() == ds.test_y.tolist()


@pytest.mark.parametrize("how", ["gz", "plain"])
def test_corrupted_content_refused(tmp_path, monkeypatch, how):
    arrays = make_mnist(tmp_path / "unused", "fashion-mnist", np.random.default_rng(7))
    trust_content(monkeypatch, "fashion-mnist", arrays)
    tampered = dict(arrays)
    images = arrays["t10k-images-idx3-ubyte.gz"].copy()
    images[1, 2, 3] ^= 1  # one bit of one pixel
    tampered["t10k-images-idx3-ubyte.gz"] = images
    write_idx(tmp_path / "fashion-mnist", tampered, how)
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", tmp_path, download=False)
    msg = str(e.value)
    assert "\n" not in msg and "t10k-images-idx3-ubyte" in msg
    assert data.SOURCES["fashion-mnist"].sha256["t10k-images-idx3-ubyte.gz"] in msg
    assert hashlib.sha256(idx_bytes(images)).hexdigest() in msg
    assert "delete it" in msg


def test_corrupted_system_copy_says_reinstall(tmp_path, monkeypatch):
    arrays = make_mnist(tmp_path / "unused", "fashion-mnist", np.random.default_rng(8))
    trust_content(monkeypatch, "fashion-mnist", arrays)
    write_idx(data.SYSTEM_DATA_ROOT / "fashion-mnist", arrays, "gz")
    f = data.SYSTEM_DATA_ROOT / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-1] + b"\x09"))
    with pytest.raises(UserError, match=r"train-labels.*reinstall dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "root", download=False)


def test_lookup_order_root_then_system(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    mine = make_mnist(tmp_path / "root", "fashion-mnist", rng)
    system = make_mnist(data.SYSTEM_DATA_ROOT, "fashion-mnist", rng)
    root, folder = tmp_path / "root", tmp_path / "root" / "fashion-mnist"
    assert set(data._locate("fashion-mnist", root, False).values()) == {
        folder / f for f in MNIST_FILES
    }
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()  # that one file comes from the system
    paths = data._locate("fashion-mnist", root, False)
    assert paths["t10k-labels-idx1-ubyte.gz"].parent == data.SYSTEM_DATA_ROOT / "fashion-mnist"
    assert paths["t10k-images-idx3-ubyte.gz"].parent == folder
    labels = "t10k-labels-idx1-ubyte.gz"
    trust_content(monkeypatch, "fashion-mnist", {**mine, labels: system[labels]})
    ds = load_dataset("fashion-mnist", root, download=False)
    assert ds.train_y.tolist() == mine["train-labels-idx1-ubyte.gz"].tolist()
    assert ds.test_y.tolist() == system["t10k-labels-idx1-ubyte.gz"].tolist()


def test_system_copy_read_in_place_without_download(tmp_path, monkeypatch):
    arrays = make_mnist(tmp_path / "unused", "fashion-mnist", np.random.default_rng(10))
    write_idx(data.SYSTEM_DATA_ROOT / "fashion-mnist", arrays, "plain")
    trust_content(monkeypatch, "fashion-mnist", arrays)
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: calls.append(a))
    ds = load_dataset("fashion-mnist", tmp_path / "root", download=True)
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert calls == [] and not (tmp_path / "root").exists()  # nothing fetched or copied


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_offline_fails_fast_through_urlopen(tmp_path, monkeypatch, name):
    def no_dns(*args, **kwargs):
        raise AssertionError("name lookup outside urlopen")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # every network access via urlopen
    calls = []

    def offline(request, timeout=None):
        calls.append(timeout)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        load_dataset(name, tmp_path)
    msg = str(e.value)
    # each unreachable mirror is tried once, not once per file
    assert len(calls) == len(data.SOURCES[name].urls) == 2
    assert all(t is not None and t <= 60 for t in calls)
    assert "\n" not in msg and msg.count("network disabled") == 2
    assert f"{tmp_path / name}/" in msg and str(data.SYSTEM_DATA_ROOT / name) in msg
    assert ("apt-get install dataset-fashion-mnist" in msg) == (name == "fashion-mnist")


def test_hanging_name_lookup_gives_up_quickly(tmp_path, monkeypatch):
    assert data._OPEN_TIMEOUT <= 5  # seconds, name resolution included
    release, calls = threading.Event(), []

    def hang(request, timeout=None):  # like a resolver waiting on a dead DNS server
        calls.append(request.full_url)
        release.wait(30)
        raise urllib.error.URLError("released")

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    monkeypatch.setattr(data, "_OPEN_TIMEOUT", 0.05)
    try:
        with pytest.raises(UserError, match=r"no answer within 0\.05 s.*apt-get install"):
            load_dataset("fashion-mnist", tmp_path)
    finally:
        release.set()
    assert len(calls) == 1  # no answer at all: the other files and mirrors are not tried


@needs_debian_fashion_mnist
def test_real_fashion_mnist_from_system_location(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_ROOT", REAL_SYSTEM_ROOT)
    ds = load_dataset("fashion-mnist", tmp_path / "root", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.shape == (1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert abs(ds.train_x.mean().item()) < 0.01  # normalised with the train split's mean
    assert not (tmp_path / "root").exists()  # read in place


@needs_debian_fashion_mnist
def test_train_on_real_fashion_mnist(tmp_path, monkeypatch):
    from landscape.store import read_run
    from landscape.train import TrainConfig, train

    monkeypatch.setattr(data, "SYSTEM_DATA_ROOT", REAL_SYSTEM_ROOT)
    cfg = TrainConfig(
        dataset="fashion-mnist",
        data_root=str(tmp_path / "root"),
        model="mlp",
        model_kwargs={"hidden": [64]},
        subset=2000,
        epochs=1,
        out=str(tmp_path / "run"),
        progress=False,
    )
    run = read_run(train(cfg) / "run.h5")
    assert run.status == "finished"
    assert run.metrics["test/acc"][-1] > 60  # percent, on the 10000 real test images


# ------------------------------------------------------------------ digits / synthetic


def test_digits():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1347, 1, 8, 8) and ds.test_x.shape == (450, 1, 8, 8)
    assert (ds.num_classes, ds.augment) == (10, "none")
    assert abs(ds.train_x.mean().item()) < 1e-3
    assert abs(ds.train_x.std().item() - 1) < 1e-3
    counts = torch.bincount(ds.test_y, minlength=10)
    assert counts.min() >= 44 and counts.max() <= 46  # stratified
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images.astype(np.float32) / 16)[:, None]
    restored = torch.cat([ds.train_x, ds.test_x]) * ds.std[0] + ds.mean[0]
    # train and test partition the 1797 images: each raw image appears exactly once
    key = lambda t: sorted(map(tuple, t.flatten(1).mul(16).round().int().tolist()))  # noqa: E731
    assert key(restored) == key(raw)
    other = load_dataset("digits", seed=7)
    assert torch.equal(other.test_x, ds.test_x) and torch.equal(other.train_x, ds.train_x)


def test_synthetic():
    ds = load_dataset("synthetic", n_train=300, n_test=100, shape=(2, 5, 6), num_classes=4)
    assert ds.train_x.shape == (300, 2, 5, 6) and ds.test_x.shape == (100, 2, 5, 6)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 4 and set(ds.train_y.tolist()) == {0, 1, 2, 3}
    assert abs(ds.train_x.std().item() - 1) < 0.1
    again = load_dataset("synthetic", n_train=300, n_test=100, shape=(2, 5, 6), num_classes=4)
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    other = load_dataset(
        "synthetic", n_train=300, n_test=100, shape=(2, 5, 6), num_classes=4, data_seed=1
    )
    assert not torch.equal(other.train_x, ds.train_x)
    # learnable: nearest class mean of the train set classifies the test set well
    means = torch.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(ds.test_x.flatten(1), means).argmin(1)
    assert (pred == ds.test_y).float().mean() > 0.9


# ---------------------------------------------------------------- subset / label noise


def test_subset_and_label_noise():
    kw = dict(n_train=200, num_classes=5)
    clean = load_dataset("synthetic", **kw)
    sub = load_dataset("synthetic", subset=50, seed=3, **kw)
    assert sub.train_x.shape[0] == 50 and torch.equal(sub.test_x, clean.test_x)
    # the subset is made of training samples, in their original order, without repeats
    rows = [(clean.train_x == x).flatten(1).all(1).nonzero().item() for x in sub.train_x]
    assert rows == sorted(set(rows)) and torch.equal(clean.train_y[rows], sub.train_y)

    noisy = load_dataset("synthetic", subset=50, label_noise=0.25, seed=3, **kw)
    assert torch.equal(noisy.train_x, sub.train_x)
    changed = noisy.train_y != sub.train_y
    assert changed.sum().item() == round(0.25 * 50)  # exactly round(p N) wrong labels
    assert noisy.train_y.min() >= 0 and noisy.train_y.max() < 5
    assert torch.equal(noisy.test_y, clean.test_y)

    assert noisy.spec == {
        "name": "synthetic",
        "n_train": 200,
        "n_test": 256,
        "shape": [3, 8, 8],
        "num_classes": 5,
        "noise": 1.0,
        "data_seed": 0,
        "subset": 50,
        "label_noise": 0.25,
        "seed": 3,
    }
    rebuilt = load_dataset(**json.loads(json.dumps(noisy.spec)))
    assert torch.equal(rebuilt.train_x, noisy.train_x)
    assert torch.equal(rebuilt.train_y, noisy.train_y)

    other = load_dataset("synthetic", subset=50, label_noise=0.25, seed=4, **kw)
    assert not torch.equal(other.train_x, noisy.train_x)
    full = load_dataset("synthetic", label_noise=0.1, **kw)
    assert (full.train_y != clean.train_y).sum().item() == 20


def test_label_noise_is_uniform_over_other_classes():
    clean = load_dataset("synthetic", n_train=4000, num_classes=4)
    noisy = load_dataset("synthetic", n_train=4000, num_classes=4, label_noise=0.5)
    changed = noisy.train_y != clean.train_y
    shift = (noisy.train_y - clean.train_y)[changed] % 4
    counts = torch.bincount(shift, minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 550  # ~667 ± 21 each of shifts 1, 2, 3


def test_digits_spec_roundtrip():
    ds = load_dataset("digits", subset=100, label_noise=0.2, seed=1)
    assert ds.spec == {"name": "digits", "subset": 100, "label_noise": 0.2, "seed": 1}
    again = load_dataset(**ds.spec)
    assert torch.equal(again.train_y, ds.train_y) and torch.equal(again.train_x, ds.train_x)


# ---------------------------------------------------------------------------- loader


def indexed(n: int, shape=(2, 3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and targets equal to each sample's index."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(n)), torch.arange(n)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_loader_visits_every_sample_once():
    x, y = indexed(103)
    loader = Loader(x, y, 10, shuffle=True, seed=1)
    assert len(loader) == 11
    sizes = [len(b) for _, b in loader]
    assert sizes == [10] * 10 + [3]
    for epoch in range(3):
        loader.set_epoch(epoch)
        bx, by = collect(loader)
        assert sorted(by.tolist()) == list(range(103))
        assert torch.equal(bx, x[by])  # inputs travel with their targets


def test_loader_drop_last():
    x, y = indexed(103)
    loader = Loader(x, y, 10, shuffle=True, drop_last=True)
    assert len(loader) == 10 and loader.num_samples == 100
    _, by = collect(loader)
    assert len(by) == 100 and len(set(by.tolist())) == 100
    assert len(Loader(x, y, 10, drop_last=True)) == 10 and len(Loader(x, y, 200)) == 1
    assert len(Loader(x, y, 200, drop_last=True)) == 0


def test_loader_deterministic_per_seed_and_epoch():
    x, y = indexed(64)
    aug = Augment(crop=1, flip=True, cutout=2)
    a = Loader(x, y, 16, shuffle=True, augment=aug, seed=5)
    b = Loader(x, y, 16, shuffle=True, augment=aug, seed=5)
    a.set_epoch(3)
    b.epoch = 3
    first = collect(a)
    for got in (collect(a), collect(b)):  # re-iterable, and the same for the same (seed, epoch)
        assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1])
    a.set_epoch(4)
    assert not torch.equal(collect(a)[1], first[1])
    c = Loader(x, y, 16, shuffle=True, augment=aug, seed=6)
    c.set_epoch(3)
    assert not torch.equal(collect(c)[1], first[1])


def test_loader_leaves_global_rng_alone():
    x, y = indexed(32)
    state = torch.get_rng_state()
    collect(Loader(x, y, 8, shuffle=True, augment=Augment(2, True, 2)))
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_without_augmentation_yields_raw_tensors():
    x, y = indexed(25)
    for (bx, by), i in zip(Loader(x, y, 10), range(0, 25, 10), strict=True):
        assert torch.equal(bx, x[i : i + 10]) and torch.equal(by, y[i : i + 10])
    for aug in (None, Augment(), Augment.named("none")):  # shuffled, but never altered
        bx, by = collect(Loader(x, y, 7, shuffle=True, augment=aug))
        assert torch.equal(bx, x[by])


def test_random_crop_is_a_window_of_the_padded_image():
    x, y = indexed(60, shape=(3, 5, 6))
    pad = 2
    bx, by = collect(Loader(x, y, 16, shuffle=True, augment=Augment(crop=pad)))
    assert bx.shape == (60, 3, 5, 6)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    shifts = set()
    for out, i in zip(bx, by.tolist(), strict=True):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out, padded[i, :, dy : dy + 5, dx : dx + 6])
        ]
        assert len(hits) == 1
        shifts.add(hits[0])
    assert len(shifts) > 10  # offsets really vary


def test_flip_is_an_exact_mirror():
    x, y = indexed(64)
    bx, by = collect(Loader(x, y, 16, augment=Augment(flip=True)))
    flipped = [torch.equal(o, x[i].flip(-1)) for o, i in zip(bx, by.tolist(), strict=True)]
    same = [torch.equal(o, x[i]) for o, i in zip(bx, by.tolist(), strict=True)]
    assert all(f != s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("side", [3, 4])
def test_cutout_zeroes_a_clipped_square(side):
    h, w = 7, 8
    x = torch.rand(200, 2, h, w) + 1  # no zeros before Cutout
    y = torch.arange(200)
    bx, _ = collect(Loader(x, y, 64, augment=Augment(cutout=side)))
    assert x.min() >= 1  # the dataset itself is not modified
    assert torch.equal(bx[bx != 0], x[bx != 0])  # untouched outside the square
    full = clipped = 0
    for out in bx:
        mask = out == 0
        assert torch.equal(mask[0], mask[1])  # all channels
        rows = mask[0].any(1).nonzero().flatten()
        cols = mask[0].any(0).nonzero().flatten()
        assert torch.equal(mask[0], mask[0].any(1)[:, None] & mask[0].any(0)[None, :])
        assert rows.tolist() == list(range(rows[0], rows[-1] + 1))  # contiguous
        assert cols.tolist() == list(range(cols[0], cols[-1] + 1))
        for idx, size in ((rows, h), (cols, w)):
            at_border = idx[0] == 0 or idx[-1] == size - 1
            assert len(idx) == side or (at_border and 0 < len(idx) < side)
        if len(rows) == len(cols) == side:
            full += 1
        else:
            clipped += 1
    assert full > 20 and clipped > 20


def reference_augment(aug: Augment, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample loop version of Augment.apply."""
    out = []
    h, w = x.shape[2:]
    for img, (dy, dx, flip, cy, cx) in zip(x, p.tolist(), strict=True):
        img = img.clone()
        if aug.crop:
            big = torch.zeros(img.shape[0], h + 2 * aug.crop, w + 2 * aug.crop)
            big[:, aug.crop : aug.crop + h, aug.crop : aug.crop + w] = img
            img = big[:, dy : dy + h, dx : dx + w].clone()
        if aug.flip and flip:
            img = img.flip(-1)
        if aug.cutout:
            t, l = cy - aug.cutout // 2, cx - aug.cutout // 2
            img[:, max(t, 0) : max(t + aug.cutout, 0), max(l, 0) : max(l + aug.cutout, 0)] = 0
        out.append(img)
    return torch.stack(out)


def test_augment_matches_per_sample_reference():
    x = torch.randn(50, 3, 9, 9)
    aug = Augment(crop=3, flip=True, cutout=5)
    p = aug.draw(50, 9, 9, torch.Generator().manual_seed(0))
    assert p[:, :2].max() == 6 and p[:, 2].unique().tolist() == [0, 1] and p[:, 3:].max() == 8
    before = x.clone()
    assert torch.equal(aug.apply(x, p), reference_augment(aug, x, p))
    assert torch.equal(x, before)


def test_train_and_test_loaders():
    ds = load_dataset("synthetic", n_train=50, n_test=30)
    tl = data.train_loader(ds, 16)
    assert tl.shuffle and tl.augment is None and len(tl) == 4
    cifar_like = dataclasses.replace(ds, augment="cifar")
    assert data.train_loader(cifar_like, 16).augment == Augment(crop=4, flip=True)
    assert data.train_loader(cifar_like, 16, augment="none").augment is None
    custom = Augment.named("cifar", cutout=8)
    assert custom == Augment(4, True, 8)
    assert data.train_loader(ds, 16, augment=custom, drop_last=True).augment == custom
    ev = data.eval_loader(ds, 7)
    assert not ev.shuffle and ev.augment is None
    assert torch.equal(collect(ev)[0], ds.test_x) and torch.equal(collect(ev)[1], ds.test_y)
    assert torch.equal(collect(data.eval_loader(ds, 7, split="train"))[0], ds.train_x)


def test_device_batches():
    x, y = indexed(20)
    pairs = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 20, 8)]
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    loader = Loader(x, y, 8)
    assert data.device_batches(loader, "cpu") is loader
    for src in (pairs, dl, loader):
        out = data.device_batches(src, "cpu")
        assert len(out) == 3
        for _ in range(2):  # re-iterable
            bx, by = collect(out)
            assert torch.equal(bx, x) and torch.equal(by, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_same_batches_on_cuda():
    ds = load_dataset("synthetic", n_train=100)
    aug = Augment(4, True, 3)
    cpu = data.train_loader(ds, 32, augment=aug, seed=2)
    gpu = data.train_loader(ds.to("cuda"), 32, augment=aug, seed=2)
    cpu.set_epoch(1)
    gpu.set_epoch(1)
    for (a, b), (c, d) in zip(cpu, gpu, strict=True):
        assert c.is_cuda and torch.equal(a, c.cpu()) and torch.equal(b, d.cpu())


def test_eval_loader_subset_is_fixed_and_seeded():
    ds = data.load_dataset("synthetic", n_train=50, n_test=20)
    a = collect(data.eval_loader(ds, 8, split="train", subset=10, seed=3))
    b = collect(data.eval_loader(ds, 8, split="train", subset=10, seed=3))
    c = collect(data.eval_loader(ds, 8, split="train", subset=10, seed=4))
    assert a[0].shape[0] == 10 and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    rows = [int((ds.train_x == r).all(dim=(1, 2, 3)).nonzero()) for r in a[0]]
    assert rows == sorted(rows) and all(torch.equal(ds.train_y[i], t) for i, t in zip(rows, a[1]))
    assert collect(data.eval_loader(ds, 8, subset=100))[0].shape[0] == 20  # larger: all
