"""Datasets as in-memory tensors, and a device-resident batch loader.

A :class:`Dataset` holds the whole train and test split as normalised float32 NCHW
tensors; ``ds.to("cuda")`` puts it on the GPU once. :class:`Loader` then slices
batches out of it with batched tensor ops (shuffle, random crop, flip, Cutout), with
all randomness drawn from a CPU ``torch.Generator`` seeded from ``(seed, epoch)``:
the batches of epoch ``e`` are the same on every device and after a resume.

Built-in datasets (``dataset_names()``):

- ``digits``: scikit-learn's bundled 8x8 digits (no download). Fixed stratified split
  of the 1797 images into 1347 train / 450 test (a ``RandomState(0)`` permutation,
  stably sorted by class, every 4th image to the test set), independent of ``seed``.
- ``mnist``, ``fashion-mnist``: the official IDX files, gzipped or not.
- ``cifar10``, ``cifar100``: the official python-pickle tarballs.
- ``synthetic``: seeded class prototypes plus Gaussian noise, any shape; for tests.

The researcher's own data: ``MODULE:CALLABLE`` (``load_dataset("mydata:build")``),
imported like a model (:func:`landscape.models.import_callable`) and called with the
dataset options; it returns ``(train, test)``, each a map-style
``torch.utils.data.Dataset`` of ``(inputs, target)`` samples (collated once with
``default_collate``: inputs may be tensors, dicts or tuples of them) or a pair of
``(inputs, targets)`` already batched along dim 0. No preprocessing or augmentation is
added; the loaders batch any input structure (:func:`landscape.utils.take`).

Each file is looked up in ``<root>/<name>/`` (``root``: the argument, else
``$LANDSCAPE_DATA``, else ``~/.cache/landscape``), then in ``/usr/share/datasets/<name>/``
(Debian's packages, e.g. ``apt-get install dataset-fashion-mnist``; read in place, never
copied), and only then downloaded into ``<root>/<name>/``; offline, the download gives up
within seconds and the error says which files to put where. Every load checks every
file: against its official MD5 as served, or, for the IDX files, against the SHA-256 of
the decompressed content, so that re-compressed and uncompressed copies are accepted
(``SOURCES`` notes how each digest was verified).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import inspect
import json
import math
import os
import pickle
import struct
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from landscape.models import check_call, import_callable, is_user_spec
from landscape.utils import Inputs, UserError, move, take, to_device

__all__ = [
    "DATASETS",
    "SOURCES",
    "SYSTEM_DATA_ROOT",
    "Augment",
    "Dataset",
    "Loader",
    "Source",
    "dataset_names",
    "default_root",
    "device_batches",
    "eval_loader",
    "holdout_indices",
    "load_dataset",
    "read_idx",
    "train_loader",
]


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """A labelled dataset held in memory.

    Built-in datasets: ``train_x``/``test_x`` are float32 NCHW tensors, already
    normalised with the per-channel ``mean``/``std`` (of pixel values in [0, 1]);
    ``train_y``/``test_y`` are int64 class indices. A user's dataset (``MODULE:CALLABLE``)
    holds its inputs as given, a tensor or a dict/tuple of tensors (rows along dim 0), its
    targets as a tensor, ``num_classes`` read off integer labels (else None) and no
    ``mean``/``std``. ``augment`` names the default training augmentation (see
    :meth:`Augment.named`). ``load_dataset(**spec)`` rebuilds this exact dataset.
    """

    name: str
    train_x: Inputs
    train_y: Tensor
    test_x: Inputs
    test_y: Tensor
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    spec: dict = field(default_factory=dict)
    # a validation hold-out of the training set (load_dataset's val_split): its samples,
    # and their indices in the full training set
    val_x: Inputs | None = None
    val_y: Tensor | None = None
    val_indices: Tensor | None = None

    @property
    def is_image(self) -> bool:
        """Whether the inputs are one NCHW image tensor (zoo models, augmentation)."""
        return isinstance(self.train_x, Tensor) and self.train_x.ndim == 4

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        if not self.is_image:
            raise UserError(
                f"{self.name}: the inputs are not NCHW images ({_shapes(self.train_x)})"
            )
        return tuple(self.train_x.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> int:
        """Height of the images (all built-in datasets have square images)."""
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.train_y.device

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with all tensors on ``device`` (no copy for tensors already there)."""
        names = ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y")
        t = {k: move(getattr(self, k), device) for k in names}
        return dataclasses.replace(self, **t)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={_shapes(self.train_x)}, "
            f"test={_shapes(self.test_x)}, num_classes={self.num_classes}, "
            f"augment={self.augment!r}, device={self.device}, spec={self.spec})"
        )


def _leaves(obj: Any) -> Iterator[Any]:
    """The values at the leaves of nested mappings, tuples and lists."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, tuple | list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def _shapes(obj: Any) -> Any:
    """``obj`` with each tensor replaced by its shape (for messages and reprs)."""
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, Mapping):
        return {k: _shapes(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_shapes(v) for v in obj)
    return type(obj).__name__


def default_root() -> Path:
    """Where datasets are stored: ``$LANDSCAPE_DATA``, else ``~/.cache/landscape``."""
    env = os.environ.get("LANDSCAPE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "landscape"


SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
"""Where Debian's ``dataset-*`` packages install datasets (``<this>/<name>/``); searched
after the data root, read in place."""


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from and how a local copy is checked.

    ``urls``: mirror base URLs, tried in order. ``md5``: the official MD5 of each file
    as served (sums as in torchvision's dataset classes); downloads must match it.
    ``sha256``: for gzipped files whose copies may be re-compressed or stored
    uncompressed, the SHA-256 of the *decompressed* content; such a copy is accepted if
    it is the served file (MD5) or holds that content. ``debian``: the Debian package
    that installs the files in ``SYSTEM_DATA_ROOT/<name>/``.
    """

    urls: tuple[str, ...]
    md5: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)
    debian: str | None = None


SOURCES: dict[str, Source] = {
    "mnist": Source(
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        # Content digests as listed, identically, by several independent public projects;
        # NOT verified here (no copy of MNIST was at hand). The official MD5 above stays
        # authoritative: a file matching it is accepted whatever these say.
        {
            "train-images-idx3-ubyte.gz": (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
            ),
            "train-labels-idx1-ubyte.gz": (
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
            ),
        },
    ),
    "fashion-mnist": Source(
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        # Content digests computed from Debian's dataset-fashion-mnist
        # (0.0~git20200523.55506a9-1). Verified against the official MD5s above: its .gz
        # files are the official deflate streams with a normalised gzip header (no file
        # name, mtime 2020-06-05); putting back the name and the original mtime
        # (2017-08-31) reproduces the official MD5 of all four files. Independent public
        # projects list the same four values.
        {
            "train-images-idx3-ubyte.gz": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
            ),
            "train-labels-idx1-ubyte.gz": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
            ),
        },
        debian="dataset-fashion-mnist",
    ),
    "cifar10": Source(
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    ),
    "cifar100": Source(
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
    ),
}


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _BadDownload(Exception):
    pass


class _Unreachable(OSError):
    """A mirror could not be reached at all (as opposed to an HTTP error)."""


class _NoAnswer(_Unreachable):
    """No answer within ``_OPEN_TIMEOUT``: the network (or its DNS) is down."""


_OPEN_TIMEOUT = 5.0
"""Seconds to open a URL (name resolution, connection, response headers). A socket
timeout does not bound name resolution, which offline can take ~20 s per attempt."""
_READ_TIMEOUT = 30.0
"""Socket timeout of an opened download (connection and each read)."""


def _open(request: urllib.request.Request) -> http.client.HTTPResponse:
    """``urllib.request.urlopen(request)``, given up after ``_OPEN_TIMEOUT`` seconds.

    The call runs in a daemon thread so that a hanging name lookup cannot hold the
    caller; an abandoned call closes its response if one comes later.
    """
    lock, done = threading.Lock(), threading.Event()
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            result = (True, urllib.request.urlopen(request, timeout=_READ_TIMEOUT))
        except Exception as e:  # re-raised in the caller's thread
            result = (False, e)
        with lock:
            if "abandoned" in box:
                if result[0]:
                    result[1].close()
                return
            box["result"] = result
        done.set()

    threading.Thread(target=call, name="landscape-urlopen", daemon=True).start()
    done.wait(_OPEN_TIMEOUT)
    with lock:
        if "result" not in box:
            box["abandoned"] = True
            raise _NoAnswer(f"no answer within {_OPEN_TIMEOUT:g} s (offline?)")
    ok, value = box["result"]
    if not ok:
        raise value
    return value


def _download(url: str, dest: Path, md5: str) -> None:
    """Stream ``url`` into a temp file next to ``dest``, check its MD5, rename.
    Raises :class:`_Unreachable` if the server cannot be reached at all."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "landscape (python-urllib)"})
    try:
        response = _open(request)
    except (urllib.error.HTTPError, _Unreachable):
        raise
    except urllib.error.URLError as e:  # name resolution, connection refused...
        raise _Unreachable(str(e)) from None
    with response as r:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None)
                with bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            actual = _md5(Path(tmp))
            if actual != md5:
                raise _BadDownload(f"{url} has md5 {actual}, expected {md5}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _locate(name: str, root: Path, download: bool) -> dict[str, Path]:
    """Where ``name``'s files are, unchecked: each file is looked up in ``root/name/``,
    then ``SYSTEM_DATA_ROOT/name/`` (as served, or uncompressed where the content has a
    digest), and downloaded into ``root/name/`` if in neither and ``download``."""
    source = SOURCES[name]
    folder = root / name
    dirs = list(dict.fromkeys([folder, SYSTEM_DATA_ROOT / name]))
    for d in (root, folder):
        if d.exists() and not d.is_dir():
            raise UserError(f"{name}: the data directory {d} is a file")
    found: dict[str, Path] = {}
    for f in source.md5:
        names = [f, f.removesuffix(".gz")] if f in source.sha256 else [f]
        odd = [d / n for d in dirs for n in names if (d / n).exists() and not (d / n).is_file()]
        if odd:
            raise UserError(f"{name}: {odd[0]} is not a file (a directory?); remove it")
        path = next((d / n for d in dirs for n in names if (d / n).is_file()), None)
        if path is not None:
            found[f] = path
    missing = [f for f in source.md5 if f not in found]
    reason = "download=False"
    if missing and download:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{name}: cannot create {folder}: {e}") from None
        failures: list[str] = []
        dead: set[str] = set()  # mirrors that cannot be reached: not tried again
        for f in list(missing):
            for base in source.urls:
                if base in dead:
                    continue
                try:
                    _download(base + f, folder / f, source.md5[f])
                except _Unreachable as e:
                    dead.update(source.urls if isinstance(e, _NoAnswer) else [base])
                    failures.append(f"{base}: {e}")
                except (OSError, http.client.HTTPException, _BadDownload) as e:
                    failures.append(f"{base + f}: {e}")
                else:
                    found[f] = folder / f
                    missing.remove(f)
                    break
        reason = "download failed: " + "; ".join(failures)
    if missing:
        apt = f" or run `apt-get install {source.debian}`" if source.debian else ""
        raise UserError(
            f"{name}: {', '.join(missing)} not found in {' or '.join(map(str, dirs))} "
            f"({reason}); place {'that file' if len(missing) == 1 else 'those files'} "
            f"(from {source.urls[0]}) in {folder}/{apt}"
        )
    return found


def _content(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped if it is a gzip file (by content, not name)."""
    with _parsing(path), open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if not gzipped:
            return f.read()
        with gzip.GzipFile(fileobj=f) as g:
            return g.read()


def _check(name: str, f: str, path: Path) -> bytes | None:
    """Refuse ``path``, the copy of ``name``'s file ``f``, unless it is the official one.

    With a content digest (``Source.sha256``): accepted if the decompressed content
    matches it, or if it is the served file (MD5); returns that content (read once).
    Otherwise it must match the MD5; returns None.
    """
    source = SOURCES[name]
    if path.is_relative_to(SYSTEM_DATA_ROOT):
        fix = f"reinstall {source.debian or 'its package'}, or put a good copy in the data root"
    else:
        fix = f"delete it (and download again from {source.urls[0]}{f})"
    if f not in source.sha256:
        actual = _md5(path)
        if actual != source.md5[f]:
            raise UserError(
                f"{path} has the wrong checksum: expected md5 {source.md5[f]}, got {actual}; " + fix
            )
        return None
    content = _content(path)
    actual = hashlib.sha256(content).hexdigest()
    if actual == source.sha256[f]:
        return content
    served = _md5(path) if path.name == f else None
    if served == source.md5[f]:
        return content
    raise UserError(
        f"{path} is not the official {f}: expected content sha256 {source.sha256[f]} "
        f"(or file md5 {source.md5[f]}), got sha256 {actual}"
        + (f", md5 {served}" if served else "")
        + f"; {fix}"
    )


def _fetch(name: str, root: Path, download: bool) -> dict[str, Path]:
    """Paths of ``name``'s files (see :func:`_locate`), each checked by :func:`_check`."""
    paths = _locate(name, root, download)
    for f, p in paths.items():
        _check(name, f, p)
    return paths


@contextlib.contextmanager
def _parsing(path: Path) -> Iterator[None]:
    """Turn any failure to parse ``path`` into a :class:`UserError`."""
    try:
        yield
    except UserError:
        raise
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        ImportError,
        struct.error,
        zlib.error,
        tarfile.TarError,
        pickle.UnpicklingError,
    ) as e:
        raise UserError(
            f"{path} is corrupt, truncated or not the expected file "
            f"({type(e).__name__}: {e}); delete it and load again"
        ) from None


# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a native-endian array.

    Header: two zero bytes, a type code, the number of dimensions, then each dimension
    as a big-endian uint32; the payload must hold exactly ``prod(dims)`` items.
    """
    path = Path(path)
    return _parse_idx(_content(path), path, ndim)


def _parse_idx(buf: bytes, path: Path, ndim: int | None = None) -> np.ndarray:
    """:func:`read_idx` on the (decompressed) bytes ``buf`` of ``path``."""
    with _parsing(path):
        if len(buf) < 4 or buf[0:2] != b"\0\0" or buf[2] not in _IDX_DTYPES:
            raise UserError(f"{path} is not an IDX file (bad magic number {buf[:4].hex()})")
        dtype, n = np.dtype(_IDX_DTYPES[buf[2]]), buf[3]
        if ndim is not None and n != ndim:
            raise UserError(f"{path}: expected {ndim} dimensions, the header says {n}")
        start = 4 + 4 * n
        if len(buf) < start:
            raise UserError(f"{path} is truncated (incomplete header)")
        dims = struct.unpack(f">{n}I", buf[4:start])
        expected = math.prod(dims) * dtype.itemsize
        if len(buf) - start != expected:
            raise UserError(
                f"{path} is truncated or corrupt: header says shape {dims} "
                f"({expected} bytes of data), found {len(buf) - start} bytes"
            )
        return np.frombuffer(buf, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))


def _normalised(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 NCHW array -> float32 tensor ``(x / 255 - mean) / std`` per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)


def _labels(y: np.ndarray, n: int, num_classes: int, what: str) -> Tensor:
    if y.shape != (n,):
        raise UserError(f"{what}: {n} images but labels of shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{what}: labels outside [0, {num_classes})")
    return torch.from_numpy(y.astype(np.int64))


def _image_dataset(name, train, test, num_classes, mean, std, augment, where) -> Dataset:
    (tx, ty), (vx, vy) = train, test
    return Dataset(
        name=name,
        train_x=_normalised(tx, mean, std),
        train_y=_labels(ty, len(tx), num_classes, f"{where} (train)"),
        test_x=_normalised(vx, mean, std),
        test_y=_labels(vy, len(vx), num_classes, f"{where} (test)"),
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment=augment,
    )


def _mnist_like(name: str, root: Path, download: bool, mean: float, std: float) -> Dataset:
    """Four IDX files, read where they were found; each is decompressed once."""
    paths = _locate(name, root, download)
    content = {f: _check(name, f, p) for f, p in paths.items()}

    def idx(f: str, ndim: int) -> np.ndarray:
        buf = content.pop(f)
        return _parse_idx(_content(paths[f]) if buf is None else buf, paths[f], ndim)

    split = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = idx(f"{prefix}-images-idx3-ubyte.gz", 3)
        y = idx(f"{prefix}-labels-idx1-ubyte.gz", 1)
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise UserError(f"{name}: {prefix}-*-ubyte files must hold unsigned bytes")
        split[part] = (x[:, None], y)
    where = paths["train-images-idx3-ubyte.gz"].parent
    return _image_dataset(name, split["train"], split["test"], 10, (mean,), (std,), "none", where)


def _mnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("mnist", root, download, 0.1307, 0.3081)


def _fashion_mnist(root: Path, download: bool) -> Dataset:
    return _mnist_like("fashion-mnist", root, download, 0.2860, 0.3530)


def _read_cifar(path: Path, members: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the pickled batches ``members`` of a CIFAR python tarball. The pickles
    are trusted: the tarball's MD5 was checked first."""
    xs, ys = [], []
    with _parsing(path), tarfile.open(path, "r:gz") as tar:
        for member in members:
            f = tar.extractfile(member)
            if f is None:
                raise UserError(f"{path}: {member} is not a regular file")
            d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8)
            y = np.asarray(d[label_key], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise UserError(f"{path}: {member} holds data {x.shape} and {len(y)} labels")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _cifar10(root: Path, download: bool) -> Dataset:
    path = _fetch("cifar10", root, download)["cifar-10-python.tar.gz"]
    folder = "cifar-10-batches-py/"
    train = _read_cifar(path, [f"{folder}data_batch_{i}" for i in range(1, 6)], b"labels")
    test = _read_cifar(path, [f"{folder}test_batch"], b"labels")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return _image_dataset("cifar10", train, test, 10, mean, std, "cifar", path)


def _cifar100(root: Path, download: bool) -> Dataset:
    path = _fetch("cifar100", root, download)["cifar-100-python.tar.gz"]
    train = _read_cifar(path, ["cifar-100-python/train"], b"fine_labels")
    test = _read_cifar(path, ["cifar-100-python/test"], b"fine_labels")
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return _image_dataset("cifar100", train, test, 100, mean, std, "cifar", path)


# Mean/std of the digits train split's pixels (scaled to [0, 1] by /16).
_DIGITS_MEAN, _DIGITS_STD = 0.3053, 0.3760


def _digits_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices (1347 / 450) for the digits labels ``y``.

    A ``RandomState(0)`` permutation (a frozen stream), stably sorted by class; every 4th
    image of that order goes to the test set, so each class is split 3:1.
    """
    perm = np.random.RandomState(0).permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    test = np.sort(order[::4])
    return np.setdiff1d(np.arange(len(y)), test), test


def _digits(root: Path, download: bool) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = (x - _DIGITS_MEAN) / _DIGITS_STD
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = (torch.from_numpy(i) for i in _digits_split(d.target))
    return Dataset(
        "digits", x[train], y[train], x[test], y[test], 10, (_DIGITS_MEAN,), (_DIGITS_STD,)
    )


def _synthetic(
    root: Path,
    download: bool,
    *,
    n_train: int = 512,
    n_test: int = 256,
    shape: tuple[int, ...] | list[int] = (3, 8, 8),
    num_classes: int = 10,
    noise: float = 1.0,
    data_seed: int = 0,
) -> Dataset:
    """Class prototypes ``N(0, 1)`` plus ``N(0, noise^2)`` per pixel, scaled to unit
    variance; balanced classes. Content depends only on these arguments."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"synthetic: shape must be (C, H, W) with positive sizes, got {shape}")
    if num_classes < 2 or n_train < 1 or n_test < 1 or noise < 0:
        raise UserError(
            "synthetic: need num_classes >= 2, n_train >= 1, n_test >= 1, noise >= 0; got "
            f"{num_classes}, {n_train}, {n_test}, {noise}"
        )
    g = torch.Generator().manual_seed(data_seed)
    protos = torch.randn(num_classes, *shape, generator=g)
    scale = 1.0 / math.sqrt(1.0 + noise**2)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = (protos[y] + noise * torch.randn(n, *shape, generator=g)) * scale
        return x, y

    (tx, ty), (vx, vy) = draw(n_train), draw(n_test)
    args = dict(n_train=n_train, n_test=n_test, shape=list(shape), num_classes=num_classes)
    args.update(noise=noise, data_seed=data_seed)
    c = shape[0]
    return Dataset("synthetic", tx, ty, vx, vy, num_classes, (0.0,) * c, (1.0,) * c, spec=args)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "synthetic": _synthetic,
}
"""Name -> builder ``(root: Path, download: bool, **options) -> Dataset`` returning the
full dataset; a builder puts its options in ``spec``. Register your own here."""


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(DATASETS)


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by mixing the integers ``key`` (SeedSequence)."""
    ss = np.random.SeedSequence([k % 2**64 for k in key])
    return torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0]))


_SUBSET, _NOISE, _LOADER, _EVAL, _VAL = 1, 2, 3, 4, 5  # streams of _generator(seed, stream)


def holdout_indices(y: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Sorted indices of ``round(fraction * len(y))`` samples drawn with ``seed``: a
    validation hold-out. Stratified for class labels (1-D integer ``y``): each class gives
    its share ``k * n_c / n`` rounded by largest remainder (within one sample); other
    targets are drawn uniformly."""
    n = len(y)
    k = round(fraction * n)
    if not 0 < fraction < 1 or not 0 < k < n:
        raise UserError(
            f"val_split {fraction} of {n} training samples leaves no validation or no "
            "training sample; use a fraction in (0, 1) that does"
        )
    perm = torch.randperm(n, generator=_generator(seed, _VAL))
    y = y.cpu()
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return perm[:k].sort().values
    ys = y[perm]
    classes, counts = torch.unique(ys, return_counts=True)
    quota = counts.double() * k / n
    share = quota.floor().long()
    extra = torch.argsort(quota - share, descending=True, stable=True)[: k - int(share.sum())]
    share[extra] += 1
    picks = [perm[ys == c][:m] for c, m in zip(classes.tolist(), share.tolist(), strict=True)]
    return torch.cat(picks).sort().values


def resolve(name: str) -> Callable[..., Any]:
    """What builds dataset ``name``: a :data:`DATASETS` builder, or the user's
    ``MODULE:CALLABLE`` (imported here, so a bad name fails before any work)."""
    if isinstance(name, str) and is_user_spec(name):
        return import_callable(name, "--dataset")
    if name not in DATASETS:
        raise UserError(
            f"unknown dataset {name!r}; choose from {', '.join(dataset_names())}, "
            "or MODULE:CALLABLE (your own)"
        )
    return DATASETS[name]


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = True,
    *,
    subset: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
    val_split: float = 0.0,
    val_seed: int = 0,
    kwargs: Mapping[str, Any] | None = None,
    **kw: Any,
) -> Dataset:
    """Load dataset ``name`` (see :func:`dataset_names`, or ``MODULE:CALLABLE``: the
    module docstring) into CPU tensors.

    ``subset=N`` keeps a seeded random subset of N training samples (original order).
    ``label_noise=p`` then replaces the labels of exactly ``round(p * N)`` seeded random
    training samples by a uniformly drawn *different* class (symmetric noise, as in the
    SAM papers' label-noise experiments). The test set never changes. ``seed`` drives only
    these two. ``val_split=f`` first holds out the fraction ``f`` of the full training set
    as ``val_x``/``val_y`` (:func:`holdout_indices` with ``val_seed``, stratified by class;
    clean labels), independent of ``seed``; the rest is the training set. ``kw`` and
    ``kwargs`` (for option names that clash with these) are the builder's options
    (``synthetic``: ``n_train``, ``n_test``, ``shape``, ``num_classes``, ``noise``,
    ``data_seed``), or the keyword arguments of the user's callable.
    """
    builder = resolve(name)
    options = {**kw, **(kwargs or {})}
    if not 0.0 <= label_noise < 1.0:
        raise UserError(f"label_noise must be in [0, 1), got {label_noise}")
    if is_user_spec(name):
        ds = _user_dataset(name, builder, options)
    else:
        root = Path(root).expanduser() if root is not None else default_root()
        try:
            inspect.signature(builder).bind(root, download, **options)
        except TypeError:
            raise UserError(f"dataset {name!r} does not take options {sorted(options)}") from None
        ds = builder(root, download, **options)
    x, y = ds.train_x, ds.train_y
    n = len(y)
    val: dict[str, Any] = {}
    if val_split:
        held = holdout_indices(y, val_split, val_seed)
        rest = torch.ones(n, dtype=torch.bool)
        rest[held] = False
        val = {"val_x": take(x, held), "val_y": y[held], "val_indices": held}
        x, y = take(x, rest.nonzero().squeeze(1)), y[rest]
        n = len(y)
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, int) or not 0 < subset <= n:
            raise UserError(f"subset must be in [1, {n}] for {name}, got {subset}")
        keep = torch.randperm(n, generator=_generator(seed, _SUBSET))[:subset].sort().values
        x, y, n = take(x, keep), y[keep], subset
    if label_noise > 0:
        if ds.num_classes is None or ds.num_classes < 2 or y.ndim != 1:
            raise UserError(f"label noise needs one class label per sample; {name} has none")
        k = round(label_noise * n)
        g = _generator(seed, _NOISE)
        idx = torch.randperm(n, generator=g)[:k]
        shift = torch.randint(1, ds.num_classes, (k,), generator=g)
        y = y.clone()
        y[idx] = (y[idx] + shift) % ds.num_classes
    spec = {"name": name, **ds.spec, "subset": subset, "label_noise": label_noise, "seed": seed}
    if val_split:
        spec.update(val_split=val_split, val_seed=val_seed)
    return dataclasses.replace(ds, train_x=x, train_y=y, spec=spec, **val)


def _user_dataset(spec: str, build: Callable[..., Any], options: dict[str, Any]) -> Dataset:
    """``build(**options)`` -> ``(train, test)`` as a :class:`Dataset` (module docstring)."""
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"--dataset {spec}: options must be JSON-serializable: {e}") from None
    check_call(build, options, f"--dataset {spec}")
    splits = build(**options)
    if not (isinstance(splits, tuple | list) and len(splits) == 2):
        raise UserError(
            f"--dataset {spec} returned an object of type {type(splits).__name__}; expected "
            "(train, test)"
        )
    (tx, ty), (vx, vy) = (
        _in_memory(spec, part, s) for part, s in zip(("train", "test"), splits, strict=True)
    )
    labels = [t for t in (ty, vy) if t.numel()]
    integer = all(
        not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool) for t in labels
    )
    num_classes = int(max(t.max() for t in labels)) + 1 if labels and integer else None
    return Dataset(spec, tx, ty, vx, vy, num_classes, (), (), spec={"kwargs": options})


def _in_memory(spec: str, part: str, split: Any) -> tuple[Inputs, Tensor]:
    """One split as ``(inputs, targets)`` with every tensor's dim 0 the sample axis."""
    where = f"--dataset {spec}: the {part} split"
    if isinstance(split, torch.utils.data.IterableDataset):
        raise UserError(f"{where} is an IterableDataset; return a map-style Dataset")
    if isinstance(split, torch.utils.data.Dataset):
        try:
            n = len(split)
        except TypeError:
            raise UserError(f"{where} has no len(); return a map-style Dataset") from None
        samples = [split[i] for i in range(n)]
        bad = next((s for s in samples if not (isinstance(s, tuple | list) and len(s) == 2)), None)
        if bad is not None:
            raise UserError(f"{where}: samples must be (inputs, target) pairs, got {_shapes(bad)}")
        if not samples:
            raise UserError(f"{where} is empty")
        try:
            split = torch.utils.data.default_collate(samples)
        except (TypeError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{where}: samples do not stack into tensors ({first})") from None
    elif not (isinstance(split, tuple | list) and len(split) == 2):
        raise UserError(
            f"{where} is of type {type(split).__name__}; expected a torch.utils.data.Dataset or "
            "a pair (inputs, targets) of tensors"
        )
    x, y = split
    if isinstance(x, list):  # default_collate turns tuple inputs into lists
        x = tuple(x)
    if not isinstance(y, Tensor) or y.ndim == 0:
        raise UserError(f"{where}: targets must be a tensor with a sample axis, got {_shapes(y)}")
    sizes = {t.shape[0] if isinstance(t, Tensor) and t.ndim else None for t in _leaves(x)}
    if sizes != {len(y)}:
        raise UserError(
            f"{where}: inputs {_shapes(x)} and targets {tuple(y.shape)} must be tensors with "
            "the same number of rows"
        )
    if not len(y):
        raise UserError(f"{where} is empty")
    return x, y


# ---------------------------------------------------------------------------- loading


@dataclass
class Augment:
    """Training augmentation, applied as batched tensor ops.

    ``crop``: zero-pad by this many pixels, then take a random window of the original
    size; ``flip``: mirror left-right with probability 1/2; ``cutout``: zero a square of
    this side at a uniformly random centre, clipped at the borders (DeVries & Taylor
    2017). Inputs are normalised, so zero is the dataset mean.
    """

    crop: int = 0
    flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop < 0 or self.cutout < 0:
            raise UserError(f"crop and cutout must be >= 0, got {self.crop}, {self.cutout}")

    @classmethod
    def named(cls, name: str, cutout: int = 0) -> Augment:
        """``"cifar"``: crop 4 + flip; ``"none"``: nothing; plus optional Cutout."""
        presets = {"cifar": cls(crop=4, flip=True), "none": cls()}
        if name not in presets:
            raise UserError(f"unknown augmentation {name!r}; choose from cifar, none")
        return dataclasses.replace(presets[name], cutout=cutout)

    @property
    def active(self) -> bool:
        return self.crop > 0 or self.flip or self.cutout > 0

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """Random parameters for ``n`` samples: int64 ``(n, 5)`` columns
        ``(dy, dx, flip, cy, cx)``: crop offset into the padded image, flip flag,
        Cutout centre. Unused columns are zero."""
        p = torch.zeros(n, 5, dtype=torch.int64)
        if self.crop:
            p[:, :2] = torch.randint(0, 2 * self.crop + 1, (n, 2), generator=generator)
        if self.flip:
            p[:, 2] = torch.randint(0, 2, (n,), generator=generator)
        if self.cutout:
            p[:, 3] = torch.randint(0, height, (n,), generator=generator)
            p[:, 4] = torch.randint(0, width, (n,), generator=generator)
        return p

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """Augment the batch ``x`` (N, C, H, W) with ``params`` from :meth:`draw` (on
        ``x``'s device). Returns a new tensor; ``x`` is not modified."""
        n, c, h, w = x.shape
        dy, dx, flip, cy, cx = params.unbind(1)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        if self.crop or self.flip:
            # one gather does both: output (i, j) reads padded (dy + i, dx + j), or
            # (dy + i, dx + w - 1 - j) when flipped
            p = self.crop
            padded = F.pad(x, (p,) * 4) if p else x
            src_cols = torch.where(flip.view(n, 1).bool(), w - 1 - cols, cols) + dx.view(n, 1)
            src = (rows + dy.view(n, 1)).view(n, h, 1) * (w + 2 * p) + src_cols.view(n, 1, w)
            x = padded.reshape(n, c, -1).gather(2, src.view(n, 1, h * w).expand(n, c, -1))
            x = x.view(n, c, h, w)
        if self.cutout:
            top = (cy - self.cutout // 2).view(n, 1)
            left = (cx - self.cutout // 2).view(n, 1)
            in_rows = (rows >= top) & (rows < top + self.cutout)
            in_cols = (cols >= left) & (cols < left + self.cutout)
            mask = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
            # in place only on the fresh tensor made by the gather above
            x = x.masked_fill_(mask, 0) if self.crop or self.flip else x.masked_fill(mask, 0)
        return x


class Loader:
    """Batches sliced from tensors that already sit on the training device.

    Re-iterable and deterministic: the order (``shuffle``) and the augmentation of an
    epoch depend only on ``(seed, epoch)``; call :meth:`set_epoch` each epoch. Random
    numbers come from a CPU generator (one small host-to-device copy per epoch), so a
    CPU and a GPU run see identical batches; there is no host sync per batch.
    Unshuffled, unaugmented batches are views of ``x`` and ``y``. ``x`` is a tensor or a
    dict/tuple of tensors (every one sliced along dim 0); augmentation needs NCHW images.

    ``rank``/``world_size`` shard it for data-parallel training: every rank draws the
    same order and augmentation and takes its contiguous ``1 / world_size`` slice of each
    (global) batch of ``batch_size``, so the ranks together see exactly one process's
    batches. The batches, and the last one unless ``drop_last``, must split evenly.
    """

    def __init__(
        self,
        x: Inputs,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        tensors = list(_leaves(x))
        if not all(isinstance(t, Tensor) and t.ndim for t in tensors):
            raise UserError(
                f"Loader: inputs must be tensors (or dicts/tuples of them), got {_shapes(x)}"
            )
        if any(len(t) != len(y) for t in tensors):
            raise UserError(f"Loader: inputs {_shapes(x)} but {len(y)} targets")
        devices = {t.device for t in tensors}
        if devices != {y.device}:
            raise UserError(
                f"Loader: inputs on {sorted(map(str, devices))} but targets on {y.device}"
            )
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        image = isinstance(x, Tensor) and x.ndim == 4
        if augment is not None and augment.active and not image:
            raise UserError(
                f"augmentation (--augment, --cutout) needs NCHW image tensors, got {_shapes(x)}"
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.epoch = 0
        if not 0 <= rank < world_size:
            raise UserError(f"Loader: rank {rank} outside [0, {world_size})")
        last = self._total % batch_size
        if batch_size % world_size or last % world_size:
            raise UserError(
                f"Loader: batches of {batch_size} (the last of {last or batch_size}) do not "
                f"split evenly across {world_size} ranks"
            )
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation of ``epoch``."""
        self.epoch = epoch

    @property
    def _total(self) -> int:
        """Samples per epoch, all ranks together."""
        n = len(self.y)
        return n - n % self.batch_size if self.drop_last else n

    @property
    def num_samples(self) -> int:
        """Samples yielded per epoch (by this rank)."""
        return self._total // self.world_size

    def __len__(self) -> int:
        return -(-self._total // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        n, b, device = self._total, self.batch_size, self.y.device
        order = params = None
        if self.shuffle or self.augment is not None:
            g = _generator(self.seed, _LOADER, self.epoch)
            if self.shuffle:
                order = torch.randperm(len(self.y), generator=g).to(device, non_blocking=True)
            if self.augment is not None:
                h, w = self.x.shape[2:]
                params = self.augment.draw(n, h, w, g).to(device, non_blocking=True)
        for start in range(0, n, b):
            share = (min(start + b, n) - start) // self.world_size
            i = start + self.rank * share  # this rank's slice [i, j) of the batch
            j = i + share
            if order is None:
                xb, yb = take(self.x, slice(i, j)), self.y[i:j]
            else:
                idx = order[i:j]
                xb, yb = take(self.x, idx), self.y[idx]
            if params is not None:
                xb = self.augment.apply(xb, params[i:j])
            yield xb, yb

    def __repr__(self) -> str:
        return (
            f"Loader(n={len(self.y)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, augment={self.augment}, seed={self.seed}, "
            f"epoch={self.epoch}, device={self.y.device}"
            + (f", rank={self.rank}/{self.world_size})" if self.world_size > 1 else ")")
        )


def train_loader(
    ds: Dataset,
    batch_size: int,
    *,
    augment: Augment | str | None = None,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Loader:
    """Shuffled, augmented loader over ``ds``'s training split, on ``ds``'s device.
    ``augment``: an :class:`Augment`, a preset name, or ``None`` for ``ds.augment``;
    ``rank``/``world_size``: this rank's slice of every batch (see :class:`Loader`)."""
    if augment is None or isinstance(augment, str):
        augment = Augment.named(augment or ds.augment)
    return Loader(
        ds.train_x,
        ds.train_y,
        batch_size,
        shuffle=True,
        drop_last=drop_last,
        augment=augment,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


def eval_loader(
    ds: Dataset,
    batch_size: int = 1000,
    *,
    split: str = "test",
    subset: int | None = None,
    seed: int = 0,
) -> Loader:
    """Unshuffled, unaugmented loader for evaluation over ``split`` ("test", "train", or
    "val": the validation hold-out).

    ``subset=N`` keeps a fixed seeded random subset of N samples (in their original
    order), so measurements repeated every epoch see the same data.
    """
    if split not in ("test", "train", "val"):
        raise UserError(f"split must be 'test', 'train' or 'val', got {split!r}")
    x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
    if y is None:
        raise UserError(f"{ds.name} has no validation split (load it with val_split)")
    if subset is not None and subset < len(y):
        if subset < 1:
            raise UserError(f"subset must be >= 1, got {subset}")
        keep = torch.randperm(len(y), generator=_generator(seed, _EVAL))[:subset].sort().values
        keep = keep.to(y.device)
        x, y = take(x, keep), y[keep]
    return Loader(x, y, batch_size)


class _OnDevice:
    def __init__(self, data: Iterable, device: torch.device) -> None:
        self.data, self.device = data, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return to_device(self.data, self.device)

    def __len__(self) -> int:
        return len(self.data)


def device_batches(data: Iterable, device: torch.device | str) -> Iterable[tuple[Inputs, Tensor]]:
    """Re-iterable ``(x, y)`` batches on ``device`` from a :class:`Loader`, a
    ``torch.utils.data.DataLoader`` or a list of ``(x, y)`` tuples."""
    device = torch.device(device)
    if isinstance(data, Loader) and data.y.device == device:
        return data
    return _OnDevice(data, device)
