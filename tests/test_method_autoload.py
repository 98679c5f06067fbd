"""The start-up hook: MergeKit sees the methods with no import, and nothing else is disturbed."""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, files

import pytest

from mergekit_sae import _hook


def installed_pth() -> bool:
    try:
        return any(f.name == "mergekit_sae_autoload.pth" for f in files("mergekit-sae") or [])
    except PackageNotFoundError:
        return False


needs_install = pytest.mark.skipif(
    not installed_pth(), reason="needs `pip install .` or `pip install -e .`"
)


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kwargs
    )


@needs_install
def test_startup_installs_only_a_light_finder():
    code = (
        "import sys; "
        "print(any(type(f).__name__ == 'PostImportFinder' for f in sys.meta_path), "
        "sorted(m for m in ('torch', 'mergekit', 'mergekit_sae.methods') if m in sys.modules))"
    )
    result = python(code)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == "True []"


@needs_install
def test_fresh_process_sees_methods_and_guard_without_importing_the_plugin():
    code = (
        "from mergekit.merge_methods import get; "
        "print(get('sae_evolve').spec.name, get('sae_prune').spec.name); "
        "from mergekit.scripts.run_yaml import run_merge; "
        "print(getattr(run_merge, '_mergekit_sae_guarded', False))"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sae_evolve", "sae_prune", "True"]


@needs_install
def test_a_broken_plugin_does_not_break_python_startup(tmp_path):
    shadow = tmp_path / "mergekit_sae"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    result = python("print('ok')", env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert result.returncode == 0
    assert result.stdout.strip() == "ok" and result.stderr == ""


def test_a_failing_action_warns_instead_of_raising(monkeypatch):
    def explode(module):
        raise RuntimeError("boom")

    monkeypatch.setitem(_hook._ACTIONS, "mergekit.merge_methods", explode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hook._run_action("mergekit.merge_methods", object())
    assert any("could not extend mergekit.merge_methods" in str(w.message) for w in caught)


def test_install_is_idempotent_and_registration_too():
    from mergekit.merge_methods import registered_methods

    before = list(sys.meta_path)
    _hook.install()
    _hook.install()
    finders = [f for f in sys.meta_path if isinstance(f, _hook.PostImportFinder)]
    assert len(finders) <= max(1, sum(isinstance(f, _hook.PostImportFinder) for f in before))
    names = [m.spec.name for m in registered_methods()]
    assert names.count("sae_evolve") == 1 and names.count("sae_prune") == 1


def test_finder_ignores_unrelated_modules():
    import mergekit

    finder = _hook.PostImportFinder()
    assert finder.find_spec("json") is None
    spec = finder.find_spec("mergekit.merge_methods", mergekit.__path__)
    assert spec is not None and isinstance(spec.loader, _hook._AfterExecLoader)
