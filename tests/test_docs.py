"""The README and docs/: every generated table agrees with the committed results JSON, the README
stays short and its links resolve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]


def generator():
    return load_script("docs/generate.py", "generate_docs")


def test_generated_tables_agree_with_the_committed_results() -> None:
    assert generator().main(["--check"]) == 0


def test_a_number_changed_in_the_json_fails_the_check(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    module = generator()
    original = module.load

    def altered(path: Path):
        data = original(path)
        if path.name == "results.json" and isinstance(data, list) and data and "test_error" in data[0]:
            data[0]["test_error"] += 0.01
        return data

    monkeypatch.setattr(module, "load", altered)
    assert module.main(["--check"]) == 1
    assert "generated tables differ from the committed results JSON" in capsys.readouterr().err


def test_every_generated_block_has_a_generator() -> None:
    module = generator()
    for path in module.DOCUMENTS:
        for name in re.findall(r"<!-- generated: ([\w-]+) -->", path.read_text()):
            assert name in module.TABLES, f"{path.name}: {name}"


def test_the_readme_is_short_and_its_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(((?:docs|recipes)/[^)#]+)", text):
        assert (REPO / link).exists(), link
    for page in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w./-]+\.(?:md|png))", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_the_callback_defaults_are_the_settings_of_the_measured_defaults_rows() -> None:
    """docs/adversarial-training.md says the defaults are the ways table's `input-pools` row with a
    cheaper refresh, measured again (docs/generate.py's CURRENT_DEFAULTS, among the cheaper steps
    measured): changing a default without a measured row behind it fails here."""
    import inspect

    import yaml

    from advtrain.callbacks import LayerwiseAdversarialTraining
    from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK

    defaults = {name: parameter.default for name, parameter in
                inspect.signature(LayerwiseAdversarialTraining).parameters.items()}
    current = generator().CURRENT_DEFAULTS
    rows = [REPO / "docs" / "results" / current.format(seed=seed) / "input-pools.yaml" for seed in (0, 1, 2)]
    for path in rows:
        config = yaml.safe_load(path.read_text())
        for name in ("capacity", "mix_fraction", "refresh_every", "refresh_size", "pooling", "bounds", "pool_device"):
            assert config[name] == defaults[name], (path, name, config[name], defaults[name])
        assert config["layers"] == list(defaults["layers"])
        assert defaults["attack"] is None
        if config["attack"] is not None:  # run folders written since the recipes write the default generator out
            assert config["attack"] == {"class_path": "advtrain.attacks.BoxLBFGS", "init_args": GENERATION_ATTACK}
    # the older rows' `attack: null` is BoxLBFGS(**GENERATION_ATTACK) as it was measured (the step's label)
    assert GENERATION_ATTACK == {"loss": "margin", "search_steps": 2, "iterations": 10, "refine_steps": 5,
                                 "target": "random"}

def test_a_way_from_a_later_run_folder_joins_its_seed_with_its_own_folders_weight_decay() -> None:
    module = generator()
    first = [{"way": "weight-decay", "seconds": 100.0}, {"way": "fast", "seconds": 250.0}]
    later = [{"way": "weight-decay", "seconds": 200.0}, {"way": "pgd", "seconds": 8000.0}]
    other_seed = [{"way": "weight-decay", "seconds": 50.0}, {"way": "fast", "seconds": 100.0}]
    runs = [module.WaysFolder(0, first, "a", "first"), module.WaysFolder(1, other_seed, "b", "other"),
            module.WaysFolder(0, later, "c", "later")]
    pgd = module.way_runs(runs, "pgd")
    assert [(run.seed, run.time_ratio) for run in pgd] == [(0, 40.0)]  # 8000 s against its own folder's 200 s
    decay = module.way_runs(runs, "weight-decay")
    assert [(run.seed, run.entry["seconds"]) for run in decay] == [(0, 100.0), (1, 50.0)]  # once per seed, the first folder's
    assert [run.time_ratio for run in module.way_runs(runs, "fast")] == [2.5, 2.0]


def test_the_ways_table_shows_a_re_evaluation_of_the_same_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A way's robust errors come from the committed re-evaluation of its weights: its own folder's,
    or a rerun's with the same test error and distortion (the same weights); a rerun that differs is
    another model, and a re-evaluation on other test images does not compare."""
    module = generator()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "REPO", tmp_path)
    robust = {"linf": {"0.1": 0.2}, "l2": {"1": 0.3}}
    entry = {"way": "fast", "test_error": 0.01, "robust_error": robust, "mean_distortion": 0.05, "seconds": 2.0}
    decay = {"way": "weight-decay", "test_error": 0.01, "robust_error": robust, "mean_distortion": 0.02, "seconds": 1.0}

    def folder(name: str, results: list[dict], report: dict | None, examples: int = 200) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        (tmp_path / name / "config.json").write_text(json.dumps({"eval_examples": examples, "seed": 0}))
        if report is not None:
            (tmp_path / name / module.RE_EVALUATION).mkdir()
            (tmp_path / name / module.RE_EVALUATION / "robustness.json").write_text(json.dumps({"fast": report}))

    later = {"examples": 200, "seed": 0, "robust_error": {"linf": {"0.1": 0.25}, "l2": {"1": 0.4}}, "ensemble": {"fab": True, "ddn": 1000}}
    folder("differs", [{**entry, "test_error": 0.02}], {**later, "robust_error": {"linf": {"0.1": 0.9}, "l2": {"1": 0.9}}})
    runs = [module.WaysFolder(0, [decay, entry], "c", "table")]
    (run,) = module.way_runs(runs, "fast")
    assert run.re_evaluation is None and run.robust_error == robust and run.attacks == "no FAB-T or DDN"

    # a rerun of the same weights, evaluated by a later ensemble in its own run: its robust errors differ
    folder("rerun", [{**entry, "robust_error": later["robust_error"]}], later)
    (run,) = module.way_runs(runs, "fast")
    assert run.robust_error == later["robust_error"] and run.attacks == "FAB-T and DDN (re-evaluated)"
    assert module.mean_robust_error(run.robust_error) == pytest.approx(0.325)

    for config in ({"eval_examples": 100, "seed": 0}, {"eval_examples": 200, "seed": 1}):
        (tmp_path / "rerun" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="re-evaluated on 200 test images with seed 0, its training run on "
                                             f"{config['eval_examples']} with seed {config['seed']}"):
            module.way_runs(runs, "fast")


def test_an_l2_re_evaluation_by_the_two_window_square_replaces_the_l2_column_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-evaluation narrowed to L2 whose ensemble records the two-window Square joins the L2
    figures, where each budget shows the most any evaluation of the same weights and images found
    (all count verified breaks only); L∞ stays with the full re-evaluation, whatever order the
    folders sort in, and the table says which Square the L2 figures had."""
    module = generator()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "REPO", tmp_path)
    entry = {"way": "pgd", "test_error": 0.01, "train_error": 0.0, "mean_distortion": 0.05, "seconds": 2.0,
             "robust_error": {"linf": {"0.1": 0.1}, "l2": {"1": 0.2, "2": 0.5}}}
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "results.json").write_text(json.dumps([entry]))
    (tmp_path / "table" / "config.json").write_text(json.dumps({"eval_examples": 200, "seed": 0}))
    ensemble = {"fab": True, "ddn": 1000}
    full = {"examples": 200, "seed": 0, "seconds": 9.0, "ensemble": ensemble, "mean_distortion": 0.05,
            "robust_error": {"linf": {"0.1": 0.15}, "l2": {"1": 0.25, "2": 0.6}},
            "broken_by": {"linf": {"0.1": {}}, "l2": {"1": {"square": 0}, "2": {"square": 0}}}}
    l2 = {"examples": 200, "seed": 0, "seconds": 5.0, "ensemble": {**ensemble, "square_l2": "two-window"},
          "mean_distortion": 0.05, "robust_error": {"l2": {"1": 0.24, "2": 0.7}},  # one example fewer at 1
          "broken_by": {"l2": {"1": {"square": 0}, "2": {"square": 20}}}}
    # the narrowed one sorts first by name, the full one after it: neither order may decide
    for name, report in ((f"{module.RE_EVALUATION}-a-square-l2", l2), (f"{module.RE_EVALUATION}-b", full)):
        (tmp_path / "table" / name).mkdir()
        (tmp_path / "table" / name / "robustness.json").write_text(json.dumps({"pgd": report}))
    runs = [module.WaysFolder(0, [entry], "c", "table")]
    (run,) = module.way_runs(runs, "pgd")
    assert run.robust_error == {"linf": {"0.1": 0.15}, "l2": {"1": 0.25, "2": 0.7}}
    assert run.re_evaluation is full or run.re_evaluation == full  # the full one stays the FAB-T and DDN table's
    assert run.attacks == "FAB-T and DDN (re-evaluated; L2 with the two-window Square)"
    monkeypatch.setattr(module, "ways_runs", lambda: [("Net", runs)])
    assert "| Net | `pgd`, seed 0 | 25% / 60% → 24% / 70% | 0 / 20 | 5 |" in module.ways_square_l2()
    # without the record, a narrowed report is an older one-window evaluation and does not win
    (tmp_path / "table" / f"{module.RE_EVALUATION}-a-square-l2" / "robustness.json").write_text(
        json.dumps({"pgd": {**l2, "ensemble": ensemble}}))
    (run,) = module.way_runs(runs, "pgd")
    assert run.report_for("l2") is not None and run.report_for("l2")["robust_error"]["l2"] == {"1": 0.25, "2": 0.6}
    assert run.attacks == "FAB-T and DDN (re-evaluated)" and module.ways_square_l2() == "(not run yet)"


def test_a_reruns_own_evaluation_stands_for_the_table_where_its_results_record_the_ensemble(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun that trained the table's weights again and whose results record the ensemble its own
    evaluation ran (runs since the recipe records it) is a re-evaluation without ``advtrain evaluate``;
    a rerun without that record, or of other weights, is not; the table's own entry that records its
    ensemble says so."""
    module = generator()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "REPO", tmp_path)
    robust = {"linf": {"0.1": 0.2}, "l2": {"1": 0.3}}
    entry = {"way": "fast", "test_error": 0.01, "train_error": 0.0, "robust_error": robust, "mean_distortion": 0.05,
             "seconds": 2.0}
    ensemble = {"fab": True, "ddn": 1000}
    later = {"robust_error": {"linf": {"0.1": 0.25}, "l2": {"1": 0.6}}, "ensemble": ensemble,
             "broken_by": {"l2": {"1": {"fab-t": 3}}}, "evaluation_seconds": 40.0}

    def folder(name: str, results: list[dict]) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        (tmp_path / name / "config.json").write_text(json.dumps({"eval_examples": 200, "seed": 0}))

    folder("table", [entry])
    runs = [module.WaysFolder(0, [entry], "c", "table")]
    folder("unrecorded", [{**entry, "robust_error": later["robust_error"]}])  # same weights, ensemble not recorded
    folder("other-weights", [{**entry, **later, "mean_distortion": 0.06}])
    (run,) = module.way_runs(runs, "fast")
    assert run.re_evaluation is None and run.robust_error == robust

    folder("rerun", [{**entry, **later}])
    (run,) = module.way_runs(runs, "fast")
    assert run.robust_error == later["robust_error"] and run.attacks == "FAB-T and DDN (re-evaluated)"
    assert run.re_evaluation["seconds"] == 40.0 and run.re_evaluation["examples"] == 200

    # the table's run evaluated other test images than the rerun: its figures do not compare
    (tmp_path / "table" / "config.json").write_text(json.dumps({"eval_examples": 100, "seed": 0}))
    with pytest.raises(ValueError, match="re-evaluated on 200 test images with seed 0, its training run on 100"):
        module.way_runs(runs, "fast")

    recorded = module.WaysFolder(0, [{**entry, "ensemble": {"fab": True, "ddn": 0}}], "c", "table")
    (tmp_path / "table" / "config.json").write_text(json.dumps({"eval_examples": 200, "seed": 0}))
    (run,) = module.way_runs([recorded], "fast")
    assert run.evaluated_with == "FAB-T, no DDN"
