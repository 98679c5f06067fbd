"""Post-import hook, installed at start-up by ``mergekit_sae_autoload.pth``.

A ``sys.meta_path`` finder that recognises two module names and otherwise returns at once:
when ``mergekit.merge_methods`` has executed it registers this package's merge methods, and
when ``mergekit.merge`` has executed it makes ``run_merge`` validate recipes and write
atomically for these methods. It imports only ``sys`` at start-up, so processes that never
import MergeKit pay one dictionary lookup per import, and a failing plugin only warns.
"""

import sys


def _register_methods(module: object) -> None:
    """Register sae_evolve and sae_prune in MergeKit's registry."""
    pending = sys.modules.get("mergekit_sae.methods")
    if pending is not None and not hasattr(pending, "register_all"):
        return  # mergekit_sae.methods is importing MergeKit right now and registers when done
    from mergekit_sae.methods import register_all

    register_all()


def _guard_run_merge(module: object) -> None:
    """Wrap mergekit.merge.run_merge with recipe checks and an atomic output directory."""
    from mergekit_sae.merging.run_guard import guard_module

    guard_module(module)


_ACTIONS = {
    "mergekit.merge_methods": _register_methods,
    "mergekit.merge": _guard_run_merge,
}


def _run_action(fullname: str, module: object) -> None:
    """Run the action for a freshly imported module; a failure warns instead of raising."""
    try:
        _ACTIONS[fullname](module)
    except Exception as error:
        import warnings

        warnings.warn(
            f"mergekit-sae could not extend {fullname}: {error!r}", RuntimeWarning, stacklevel=2
        )


class _AfterExecLoader:
    """Delegates to the real loader and runs the action once the module has executed."""

    def __init__(self, loader: object, fullname: str) -> None:
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        _run_action(self._fullname, module)

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


class PostImportFinder:
    """Finds nothing itself; wraps the loader of the watched MergeKit modules."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in _ACTIONS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _AfterExecLoader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Put the finder first on sys.meta_path once; act now on already-imported modules."""
    if not any(isinstance(finder, PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())
    for fullname in _ACTIONS:
        module = sys.modules.get(fullname)
        if module is not None:
            _run_action(fullname, module)


install()
