"""The finder that lets mutmut's path-named mutants reach ``advtrain.callbacks`` and ``advtrain.recipes``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mutation_aliases import path_name, under_mutmut

TESTS = Path(__file__).resolve().parent


def test_installed_names_map_to_path_names_and_nothing_else() -> None:
    assert path_name("advtrain.callbacks") == "callbacks"
    assert path_name("advtrain.callbacks.layerwise_adversarial_training") == "callbacks.layerwise_adversarial_training"
    assert path_name("advtrain.recipes.run_folder") == "recipes.run_folder"
    assert path_name("advtrain.callbacksx") is None
    assert path_name("advtrain.pool") is None


def _fake_mutants(root: Path) -> Path:
    mutants = root / "mutants"
    for top in ("callbacks", "recipes"):
        (mutants / top).mkdir(parents=True)
        (mutants / top / "__init__.py").write_text("")
    (mutants / "callbacks" / "thing.py").write_text("def f():\n    return 'mutated copy'\n")
    return mutants


def test_only_a_mutants_copy_with_both_packages_counts_as_mutmut(tmp_path: Path) -> None:
    mutants = _fake_mutants(tmp_path)
    assert under_mutmut(mutants)
    assert not under_mutmut(tmp_path)
    (mutants / "recipes" / "__init__.py").unlink()
    assert not under_mutmut(mutants)


def test_under_mutmut_the_installed_name_is_the_path_named_module_of_the_copy(tmp_path: Path) -> None:
    mutants = _fake_mutants(tmp_path)
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from mutation_aliases import install_if_mutating\n"
        "assert install_if_mutating()\n"
        "assert not install_if_mutating()  # once only\n"
        "import advtrain.callbacks.thing as installed\n"
        "import callbacks.thing as copy\n"
        "assert installed is copy, (installed, copy)\n"
        "assert installed.f.__module__ == 'callbacks.thing'\n"
        "assert installed.f() == 'mutated copy'\n"
        "from advtrain.callbacks import thing\n"
        "assert thing is copy\n"
        "import advtrain.pool\n"
        "assert advtrain.pool.__name__ == 'advtrain.pool'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=mutants, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_mutation_tests_keep_only_the_files_named_and_only_inside_mutmuts_copy(monkeypatch, tmp_path: Path) -> None:
    """``ADVTRAIN_MUTATION_TESTS`` deselects every test outside the files it names, inside mutmut's
    copy only; elsewhere the suite runs whole."""
    from types import SimpleNamespace

    import conftest

    items = [SimpleNamespace(nodeid=f"tests/{name}::test_{index}")
             for index, name in enumerate(["test_attacks.py", "test_layerwise_callback.py", "test_lbfgs.py"])]
    deselected = []
    config = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    monkeypatch.setenv("ADVTRAIN_MUTATION_TESTS", "tests/test_attacks.py, tests/test_lbfgs.py")
    kept = list(items)
    monkeypatch.chdir(tmp_path)  # not mutmut's copy: nothing deselected
    conftest.pytest_collection_modifyitems(config, kept)
    assert kept == items and deselected == []
    monkeypatch.chdir(_fake_mutants(tmp_path))
    conftest.pytest_collection_modifyitems(config, kept)
    assert [item.nodeid for item in kept] == ["tests/test_attacks.py::test_0", "tests/test_lbfgs.py::test_2"]
    assert [item.nodeid for item in deselected] == ["tests/test_layerwise_callback.py::test_1"]
