"""Register the transformers integration when transformers' quantizer registry is imported, not before.

``import quick`` must stay cheap (the CLI imports the package; torch and transformers take seconds), yet a user
expects ``import quick`` followed by ``AutoModelForCausalLM.from_pretrained(quick_checkpoint)`` to work, in
whichever order the two libraries were imported. So:

* if ``transformers.quantizers.auto`` is already imported, :func:`install` registers at once;
* otherwise it puts a finder at the front of ``sys.meta_path`` that answers for that one module only: it asks the
  other finders for the real spec and wraps its loader so that, right after the module has run, the quantizer is
  registered (and the finder removes itself). Every other import goes past it untouched.

Only stdlib here. Set ``QUICK_NO_TRANSFORMERS_HOOK=1`` to leave transformers alone (then call
``quick.register_with_transformers()`` by hand).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType

from quick import settings

TARGET = "transformers.quantizers.auto"
_LOCK = threading.Lock()


def register_with_transformers() -> bool:
    """Register QUICK's ``quant_method`` with transformers now (imports transformers); True if newly registered."""
    from quick.integrations.transformers import register

    return register()


def _register_quietly() -> None:
    own = sys.modules.get("quick.integrations.transformers")
    if own is not None and not hasattr(own, "register"):
        return  # that module is being imported (it imports transformers): it registers itself at its end
    try:
        register_with_transformers()
    except Exception as e:  # a broken integration must not break `import transformers` for everything else
        warnings.warn(
            f"quick: registering the transformers integration failed ({type(e).__name__}: {e}); "
            "QUICK checkpoints will not load through transformers' from_pretrained",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers the quantizer."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _uninstall()
        _register_quietly()

    def __getattr__(self, name: str):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """Answers only for :data:`TARGET`; every other name falls through to the next finder."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


_FINDER = _TransformersFinder()


def _uninstall() -> None:
    with _LOCK:
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else once it is (see the module docstring)."""
    if not settings.transformers_hook_enabled():
        return
    if TARGET in sys.modules:
        _register_quietly()
        return
    with _LOCK:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
