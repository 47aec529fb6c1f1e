"""What every recipe's Trainer carries: checkpoints to resume from, the random state and wall time
they need to resume exactly, and progress that reads well without a terminal."""

from __future__ import annotations

import os
import random
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from typing_extensions import override


class RandomState(Callback):
    """Keeps the global random state (Python, NumPy, torch CPU and CUDA) in checkpoints, so a
    resumed run draws what an uninterrupted one would have (dropout masks, for one)."""

    @override
    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)  # loads with weights_only
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class WallClock(Callback):
    """Seconds spent training, carried across a resume (``seconds`` after ``fit``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: float | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add()

    def _add(self) -> None:
        if self._started is not None:
            now = time.perf_counter()
            self.seconds += now - self._started
            self._started = now

    @override
    def state_dict(self) -> dict[str, Any]:
        self._add()
        return {"seconds": self.seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = float(state_dict["seconds"])


class EpochLines(Callback):
    """One line per epoch with the logged training and validation metrics (clean and robust
    validation error where the run validates with ``AdversarialEvaluation``): the progress of a
    run whose output goes to a file (a progress bar there would write thousands of
    carriage-return updates). Lightning calls it after the epoch's validation."""

    def __init__(self, label: str) -> None:
        self.label = label

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scalars = {name: float(value) for name, value in trainer.callback_metrics.items() if torch.as_tensor(value).numel() == 1}
        parts = [f"{name} {value:.4g}" for name, value in sorted(scalars.items()) if name.startswith("train/") or name == "val/err"]
        curves: dict[str, list[tuple[float, float]]] = {}
        for name, value in scalars.items():  # adv_val/robust_err@linf=0.1 -> one group per norm
            if name.startswith("adv_val/robust_err@"):
                norm, _, epsilon = name.removeprefix("adv_val/robust_err@").partition("=")
                curves.setdefault(norm, []).append((float(epsilon), value))
        for norm, points in curves.items():
            points.sort()
            parts.append(f"robust {norm} {'/'.join(f'{e:g}' for e, _ in points)}: {'/'.join(f'{v:.3f}' for _, v in points)}")
        if "adv_val/checks_failed" in scalars:
            parts.append(f"checks failed {scalars['adv_val/checks_failed']:.0f}")
        metrics = ", ".join(parts)
        print(f"{self.label}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}" + (f": {metrics}" if metrics else ""),
              flush=True)


def on_a_terminal() -> bool:
    """Whether standard output is a terminal (progress bars) or a file or pipe (one line per epoch)."""
    return sys.stdout.isatty()


def progress(label: str) -> list[Callback]:
    """The progress callbacks for a run: none on a terminal (Lightning's bar), else :class:`EpochLines`."""
    return [] if on_a_terminal() else [EpochLines(label)]


class LastCheckpoint(ModelCheckpoint):
    """``<folder>/last.ckpt`` after every training epoch, written to a temporary file and renamed, so
    a run killed while saving keeps the previous epoch's checkpoint whole."""

    def __init__(self, folder: Path) -> None:
        super().__init__(dirpath=folder, filename="last", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True,
                         enable_version_counter=False)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = f"{filepath}.part"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        pass  # the one checkpoint is replaced in place, never removed


def checkpoints(folder: Path) -> ModelCheckpoint:
    """``<folder>/last.ckpt`` at the end of every training epoch, for ``--resume``."""
    return LastCheckpoint(folder)


def last_checkpoint(folder: Path) -> str | None:
    """The checkpoint to resume from in ``folder``, if an earlier attempt left one.

    Raises:
        SystemExit: the file is empty or truncated (not a whole torch zip archive), naming it and
            what to do, instead of torch's zip-reader traceback at load time.
    """
    path = folder / "last.ckpt"
    if not path.is_file():
        return None
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at its end
        raise SystemExit(f"advtrain: {path} is empty or truncated ({path.stat().st_size:,} bytes; a copy cut short?), "
                         "so the run cannot resume from it: delete it to train this part of the run from its start")
    return str(path)


def fit(trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule, folder: Path, recipe: str) -> None:
    """``trainer.fit`` from the last checkpoint in ``folder`` (where an earlier attempt left one). A fit
    that SIGTERM stopped is not a finished one: Lightning ends it with a ``SystemExit`` of status 0
    (or returns as if training had ended), so this exits with status 1 and says how to continue.

    Raises:
        SystemExit: the run received SIGTERM or SIGINT (exit status 1), saying how to continue it.
    """
    def stopped(by: str) -> str:
        return (f"advtrain {recipe}: stopped by {by} before training finished; the last epoch's checkpoint is in "
                f"{folder}: run the same command with --resume to continue")

    try:
        trainer.fit(module, datamodule=data, ckpt_path=last_checkpoint(folder))
    except SIGTERMException as error:  # a SystemExit without a code: the process would exit 0
        raise SystemExit(stopped("SIGTERM")) from error
    except SystemExit as error:  # Lightning turns Ctrl+C (SIGINT) into sys.exit(1) without a word on resuming
        if trainer.interrupted:
            raise SystemExit(stopped("an interrupt (Ctrl+C)")) from error
        raise
    if trainer.received_sigterm:
        raise SystemExit(stopped("SIGTERM"))

