"""Run folders in process: every function of ``recipes/run_folder.py`` called directly, with the values
it must produce. ``tests/test_runs.py`` drives the same code through ``advtrain …`` subprocesses,
which mutation testing cannot see; these tests are the ones that fail when a line of it breaks."""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from advtrain.recipes.run_folder import (
    CLAIM,
    add_common_arguments,
    check_common_settings,
    claim,
    config_of,
    load_weights,
    log_image,
    log_table,
    save_weights,
    start_run_folder,
    start_wandb,
    strict_json,
    wandb_mode,
    write_atomically,
    write_json,
    write_results,
    write_text,
)

from tests.wandb_records import finished_records, history


def parser_with_common_arguments(output: str = "runs/default") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advtrain test")
    add_common_arguments(parser, output)
    return parser


def test_common_arguments_parse_to_typed_values_and_their_defaults() -> None:
    parser = parser_with_common_arguments("runs/default")
    defaults = parser.parse_args([])
    assert vars(defaults) == {"output": Path("runs/default"), "wandb": None, "seed": 0, "data_dir": None}
    given = parser.parse_args(["--output", "elsewhere", "--wandb", "off", "--seed", "7", "--data-dir", "/data"])
    assert vars(given) == {"output": Path("elsewhere"), "wandb": "off", "seed": 7, "data_dir": "/data"}
    assert isinstance(given.output, Path) and isinstance(given.seed, int)
    assert [parser.parse_args(["--wandb", mode]).wandb for mode in ("offline", "online", "off")] == ["offline", "online", "off"]
    for bad in (["--wandb", "on"], ["--seed", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_common_arguments_help_says_what_each_default_is() -> None:
    assert " ".join(parser_with_common_arguments().format_help().split()) == (
        "usage: advtrain test [-h] [--output OUTPUT] [--wandb {offline,online,off}] [--seed SEED] [--data-dir DATA_DIR] "
        "options: -h, --help show this help message and exit "
        "--output OUTPUT run folder, new or empty: a folder holding another run is refused "
        "--wandb {offline,online,off} W&B mode (default: online with WANDB_API_KEY set, else offline) "
        "--seed SEED --data-dir DATA_DIR MNIST root (default: $ADVTRAIN_DATA_DIR, else ~/.cache/advtrain)")


def test_wandb_mode_is_the_flag_else_online_only_with_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(argparse.Namespace(wandb="off")) == "off"
    assert wandb_mode(argparse.Namespace(wandb=None)) == "offline"
    assert wandb_mode(argparse.Namespace()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "")
    assert wandb_mode(argparse.Namespace()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert wandb_mode(argparse.Namespace(wandb=None)) == "online"
    assert wandb_mode(argparse.Namespace(wandb="offline")) == "offline"


def test_config_is_plain_json_without_callables() -> None:
    args = argparse.Namespace(output=Path("a/b"), dirs=[Path("c"), Path("d")], seed=3, rate=0.5, func=print, name=None)
    assert config_of(args) == {"output": "a/b", "dirs": ["c", "d"], "seed": 3, "rate": 0.5, "name": None}


def test_strict_json_nulls_every_non_finite_float_at_any_depth() -> None:
    data = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": math.nan, "e": "x"}, "f": 3}
    assert strict_json(data) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": None, "e": "x"}, "f": 3}
    assert strict_json(0.25) == 0.25 and strict_json(math.nan) is None


def test_write_atomically_writes_beside_the_target_and_renames(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    seen: list[Path] = []

    def write(temporary: Path) -> None:
        seen.append(temporary)
        assert temporary.exists() and target.read_text() == "old"  # the target is whole until the rename
        temporary.write_text("new")

    write_atomically(target, write)
    (temporary,) = seen
    assert temporary.parent == tmp_path  # the same filesystem, so the rename is atomic
    assert temporary.name.startswith(".results.json.") and temporary.name.endswith(".part")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "model.pt"
    target.write_text("old")

    def write(temporary: Path) -> None:
        temporary.write_text("half")
        raise error

    with pytest.raises(type(error)):
        write_atomically(target, write)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_write_that_removed_its_temporary_before_failing_raises_its_own_error(tmp_path: Path) -> None:
    def write(temporary: Path) -> None:
        temporary.unlink()
        raise RuntimeError("the writer's own error")

    with pytest.raises(RuntimeError, match="the writer's own error"):
        write_atomically(tmp_path / "results.json", write)
    assert list(tmp_path.iterdir()) == []


def test_write_text_and_write_json(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", "hello\n")
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    write_json(tmp_path / "r.json", {"error": math.nan, "rows": [1, 2]})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"error": None, "rows": [1, 2]}
    assert text == json.dumps({"error": None, "rows": [1, 2]}, indent=2)  # indented, and null, not NaN


def test_write_results_writes_both_files_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = argparse.Namespace(output=tmp_path)
    write_results(args, {"err": math.inf}, "| a |\n|---|\n| 1 |\n")
    assert json.loads((tmp_path / "results.json").read_text()) == {"err": None}
    assert (tmp_path / "results.md").read_text() == "| a |\n|---|\n| 1 |\n"
    assert capsys.readouterr().out == f"\n| a |\n|---|\n| 1 |\n\nresults in {tmp_path}\n"


def test_weights_round_trip_through_save_and_load(tmp_path: Path) -> None:
    state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.arange(3.0)}
    save_weights(tmp_path / "model.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    loaded = load_weights(tmp_path / "model.pt", "evaluate")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_lightning_checkpoint_gives_the_models_weights_without_the_prefix(tmp_path: Path) -> None:
    checkpoint = {"epoch": 3, "state_dict": {"model.0.weight": torch.ones(2, 2), "model.0.bias": torch.zeros(2),
                                             "metric.total": torch.tensor(5)}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = load_weights(tmp_path / "last.ckpt", "evaluate")
    assert sorted(loaded) == ["0.bias", "0.weight"] and torch.equal(loaded["0.weight"], torch.ones(2, 2))


def test_weights_are_loaded_to_the_cpu_and_only_as_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    calls: list[dict] = []
    real_load = torch.load

    def recording_load(path, **kwargs):
        calls.append(kwargs)
        return real_load(path, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    load_weights(tmp_path / "model.pt", "evaluate")
    assert calls == [{"map_location": "cpu", "weights_only": True}]  # a CUDA checkpoint loads on a CPU-only machine


class RunsCode:
    """A pickle that writes a file when it is unpickled: what ``weights_only=False`` would let a file do."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    RunsCode.marker = str(tmp_path / "code_ran")
    path = tmp_path / "model.pt"
    with path.open("wb") as handle:
        pickle.dump({"w": RunsCode()}, handle, protocol=2)
    with pytest.raises(SystemExit) as refused:
        load_weights(path, "evaluate", "--weights")
    message = str(refused.value)
    assert message.startswith(f"advtrain evaluate: --weights {path} is not a saved state dict (torch.save of model.state_dict()")
    assert "UnpicklingError" in message
    assert message.endswith("It is never loaded with weights_only=False, which could run code from the file")
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize(("state", "kind"), [([torch.ones(1)], "list"), ({}, "dict"), ({"w": 1.0}, "dict"),
                                             ({"w": torch.ones(1), "step": 3}, "dict")],
                         ids=["list", "empty", "float", "mixed"])
def test_anything_but_a_dict_of_tensors_is_refused_by_name(tmp_path: Path, state, kind: str) -> None:
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(SystemExit) as refused:
        load_weights(tmp_path / "model.pt", "evaluate")
    assert str(refused.value) == (f"advtrain evaluate: --checkpoint {tmp_path / 'model.pt'} holds a {kind}, not a state dict "
                                  "of tensors (pass the model.pt a recipe wrote, or a Lightning checkpoint of "
                                  "advtrain.Classifier)")


def test_a_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        load_weights(tmp_path / "none.pt", "table2")
    assert str(refused.value) == f"advtrain table2: --checkpoint {tmp_path / 'none.pt'}: no such file"
    assert isinstance(refused.value.__cause__, FileNotFoundError)


def namespace(output: Path, **settings) -> argparse.Namespace:
    return argparse.Namespace(output=output, recipe="adversarial-training", seed=0, lr=0.1, **settings)


def test_a_new_run_folder_holds_the_claim_the_config_and_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/bin/advtrain", "adversarial-training", "--seed", "0"])
    output = tmp_path / "a" / "run"
    args = namespace(output, resume=False, callback=print)
    assert start_run_folder(args) == output
    assert sorted(p.name for p in output.iterdir()) == [CLAIM, "command.txt", "config.json", "environment.json"]
    assert json.loads((output / "config.json").read_text()) == {
        "output": str(output), "recipe": "adversarial-training", "seed": 0, "lr": 0.1, "resume": False}
    assert (output / "command.txt").read_text() == "advtrain adversarial-training --seed 0\n"


def test_the_run_folder_records_the_thread_count_its_rounding_depends_on(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        start_run_folder(namespace(tmp_path / "one"))
        torch.set_num_threads(2)
        start_run_folder(namespace(tmp_path / "two"))
    finally:
        torch.set_num_threads(threads)
    recorded = [json.loads((tmp_path / name / "environment.json").read_text()) for name in ("one", "two")]
    assert [entry["torch_threads"] for entry in recorded] == [1, 2]
    assert recorded[0]["torch"] == torch.__version__


def test_an_empty_existing_folder_is_used(tmp_path: Path) -> None:
    assert start_run_folder(namespace(tmp_path)) == tmp_path
    assert (tmp_path / "config.json").is_file()


@pytest.mark.parametrize("resumable", [True, False], ids=["resumable", "not-resumable"])
def test_a_folder_with_another_runs_files_is_refused_and_kept(tmp_path: Path, resumable: bool) -> None:
    (tmp_path / "results.json").write_text("theirs")
    args = namespace(tmp_path, resume=False) if resumable else namespace(tmp_path)
    with pytest.raises(SystemExit) as refused:
        start_run_folder(args)
    hint = " (add --resume to continue it)" if resumable else ""
    assert str(refused.value) == (f"advtrain adversarial-training: --output {tmp_path} already holds files of another run; "
                                  f"choose a new folder{hint}: nothing is overwritten")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"] and (tmp_path / "results.json").read_text() == "theirs"


def test_an_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="already holds files of another run"):
        start_run_folder(namespace(tmp_path / "file"))


@pytest.mark.parametrize("settings", [{"recipe": None}, {}], ids=["none", "absent"])
def test_a_recipe_without_a_name_is_called_recipe(tmp_path: Path, settings: dict) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(SystemExit, match=r"^advtrain recipe: --output"):
        start_run_folder(argparse.Namespace(output=tmp_path, **settings))


def test_a_run_that_claims_the_folder_between_the_check_and_the_claim_wins(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "run"
    real_mkdir = Path.mkdir

    def mkdir_then_another_run_claims(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        (self / CLAIM).touch()  # the other run, started at the same moment, claims it first

    monkeypatch.setattr(Path, "mkdir", mkdir_then_another_run_claims)
    with pytest.raises(SystemExit) as refused:
        start_run_folder(namespace(output))
    assert str(refused.value).startswith(f"advtrain adversarial-training: --output {output} was claimed by another run")
    assert [p.name for p in output.iterdir()] == [CLAIM]


def test_resume_continues_only_the_same_settings(tmp_path: Path) -> None:
    start_run_folder(namespace(tmp_path, resume=False, wandb="off"))
    (tmp_path / "model.pt").write_text("kept")
    assert start_run_folder(namespace(tmp_path, resume=True, wandb="online")) == tmp_path  # resume and wandb may differ
    assert (tmp_path / "model.pt").read_text() == "kept"
    assert json.loads((tmp_path / "config.json").read_text())["wandb"] == "off"  # the saved config is not rewritten
    with pytest.raises(SystemExit) as refused:
        start_run_folder(argparse.Namespace(output=tmp_path, recipe="adversarial-training", seed=1, lr=0.1, resume=True,
                                            wandb="off", extra=2))
    assert str(refused.value) == (f"advtrain adversarial-training: --resume: the run in {tmp_path} was started with other "
                                  "settings (extra: None then, 2 now, seed: 0 then, 1 now)")


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        start_run_folder(namespace(tmp_path / "new", resume=True))
    assert str(refused.value) == (f"advtrain adversarial-training: --resume: {tmp_path / 'new'} holds no run to continue "
                                  "(no config.json)")
    assert not (tmp_path / "new").exists()


def test_a_folder_that_cannot_be_written_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(SystemExit) as refused:
        start_run_folder(namespace(tmp_path / "run"))
    assert str(refused.value) == (f"advtrain adversarial-training: cannot write the run folder --output {tmp_path / 'run'}: "
                                  "Permission denied")


def test_settings_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--lr must be positive"):
        start_run_folder(argparse.Namespace(output=tmp_path / "run", recipe="r", lr=0.0))
    assert not (tmp_path / "run").exists()


def test_a_second_claim_on_one_folder_is_refused(tmp_path: Path) -> None:
    claim(tmp_path, "table1")
    assert (tmp_path / CLAIM).stat().st_mode & 0o777 == 0o644 & ~_umask()
    with pytest.raises(SystemExit) as refused:
        claim(tmp_path, "table1")
    assert str(refused.value) == (f"advtrain table1: --output {tmp_path} was claimed by another run started at the same "
                                  "time; choose a new folder: nothing is overwritten")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(("settings", "message"), [
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"eval_examples": -1}, "--eval-examples must be at least 1, got -1"),
    ({"lr": 0.0}, "--lr must be positive and finite, got 0.0"),
    ({"lr": -0.1}, "--lr must be positive and finite, got -0.1"),
    ({"lr": math.inf}, "--lr must be positive and finite, got inf"),
    ({"lr": math.nan}, "--lr must be positive and finite, got nan"),
    ({"seed": -1}, r"--seed must be in [0, 2**32), got -1"),
    ({"seed": 2**32}, r"--seed must be in [0, 2**32), got 4294967296"),
], ids=["batch-size", "eval-examples", "lr-zero", "lr-negative", "lr-inf", "lr-nan", "seed-negative", "seed-too-big"])
def test_a_setting_that_cannot_work_is_named(settings: dict, message: str) -> None:
    with pytest.raises(SystemExit) as refused:
        check_common_settings(argparse.Namespace(**settings), "table1")
    assert str(refused.value) == f"advtrain table1: {message}"


def test_the_edges_of_each_setting_are_accepted() -> None:
    check_common_settings(argparse.Namespace(batch_size=1, eval_examples=1, lr=1e-300, seed=0), "table1")
    check_common_settings(argparse.Namespace(seed=2**32 - 1, lr=None, batch_size=None, accelerator="cpu"), "table1")
    check_common_settings(argparse.Namespace(), "table1")


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_a_gpu_accelerator_needs_a_cuda_device(accelerator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        check_common_settings(argparse.Namespace(accelerator=accelerator), "evaluate")
    assert str(refused.value) == (f"advtrain evaluate: --accelerator {accelerator}: this machine has no CUDA device; use "
                                  "--accelerator cpu or auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_common_settings(argparse.Namespace(accelerator=accelerator), "evaluate")


def test_without_wandb_nothing_is_started_or_logged(tmp_path: Path) -> None:
    assert start_wandb(argparse.Namespace(output=tmp_path, wandb="off"), "table1") is None
    log_table(None, "t", ["a"], [[1]])
    log_image(None, "i", tmp_path / "missing.png", "caption")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fresh_wandb():
    """W&B torn down after the test: its process-wide settings would carry into later tests' loggers."""
    import wandb

    yield
    wandb.teardown()


def test_an_offline_run_holds_the_recipes_settings_tables_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     fresh_wandb) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    image = tmp_path / "figure.png"
    from PIL import Image

    Image.new("L", (4, 4), 128).save(image)
    args = argparse.Namespace(output=tmp_path, wandb=None, seed=5, tool=print)
    run = start_wandb(args, "table1")
    try:
        assert run.settings.mode == "offline" and run.project == "advtrain"
        assert run.group == "table1" and run.name == "table1" and Path(run.dir).is_relative_to(tmp_path)
        assert dict(run.config) == {"output": str(tmp_path), "wandb": None, "seed": 5}
        log_table(run, "table1/result", ("model", "error"), [("FC10", 0.5), ("FC100", 0.25)])
        log_image(run, "table1/figure", image, "the figure")
    finally:
        run.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    series = history(run_file)
    assert series["table1/result/_type"] == ["table-file"] and series["table1/result/ncols"] == [2]
    assert series["table1/result/nrows"] == [2] and series["table1/figure/_type"] == ["image-file"]
    assert series["table1/figure/caption"] == ["the figure"]
    table_file = next(Path(run.dir).rglob("result_*.table.json"))
    assert json.loads(table_file.read_text()) == {"columns": ["model", "error"], "data": [["FC10", 0.5], ["FC100", 0.25]]}
    (tmp_path / "second").mkdir()
    unfinished = start_wandb(argparse.Namespace(output=tmp_path / "second", wandb="offline"), "ways", "pgd")
    named = start_wandb(argparse.Namespace(output=tmp_path / "second", wandb="offline"), "ways", "fast")
    try:  # a recipe's next way starts its own run: the one before is finished, not returned again
        assert named.id != unfinished.id and named.name == "fast" and named.group == "ways"
        (first_file,) = Path(unfinished.dir).parent.glob("run-*.wandb")
        assert any(record.WhichOneof("record_type") == "run" for record in finished_records(first_file))
    finally:
        named.finish()

