"""Lets ``import deep_ep`` (and ``deep_ep_cpp``) give OpenEP, without ever shadowing a real DeepEP silently.

Installed by the ``openep-deep-ep-alias`` distribution (``pip install ./python/deep_ep_alias`` in the OpenEP
repository), whose ``openep_deep_ep_alias.pth`` calls :func:`install` when Python starts. :func:`install` only
puts a small finder at the front of ``sys.meta_path``; it imports nothing (not even OpenEP) until a program
imports ``deep_ep`` or ``deep_ep_cpp``. The modules it then serves live in ``_modules/`` next to this file (not on
``sys.path``) and re-export OpenEP's own objects: ``deep_ep.Buffer is openep.Buffer``, and so on.

At the first import of ``deep_ep`` or ``deep_ep_cpp`` in a process the finder decides, once, which package both
names give:

* no other ``deep_ep`` / ``deep_ep_cpp`` is importable: OpenEP's;
* another one is importable (a real DeepEP, found by the other finders of ``sys.meta_path``: ``sys.path``,
  editable installs, ...): ``OPENEP_SHADOW_DEEP_EP`` decides.

  - unset: the other one is used, and a ``RuntimeWarning`` names it and says how to choose;
  - ``1`` (true/yes/on): OpenEP's is used;
  - ``0`` (false/no/off): the other one is used, without the warning.

Nothing here imports ``openep`` or ``torch``; a missing OpenEP surfaces as an ImportError of ``deep_ep`` that says
what to install.
"""

import importlib.machinery
import os
import sys
import threading
import warnings

__all__ = ["install", "uninstall", "decision", "MODULES_DIR", "SHADOW_ENV"]

#: Where OpenEP's deep_ep and deep_ep_cpp modules are (not on sys.path: only the finder serves them).
MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_modules")
#: The environment variable that lets OpenEP take deep_ep's place when a real DeepEP is importable.
SHADOW_ENV = "OPENEP_SHADOW_DEEP_EP"

_NAMES = ("deep_ep", "deep_ep_cpp")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _shadow_choice():
    """True (OpenEP wins), False (the other deep_ep wins, quietly) or None (unset: the other wins, with a warning)."""
    raw = os.environ.get(SHADOW_ENV, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        warnings.warn(f"{SHADOW_ENV}={raw!r} is not one of 0/1/true/false/yes/no/on/off; treated as unset",
                      RuntimeWarning, stacklevel=2)
    return None


def _is_ours(spec):
    locations = [spec.origin] if spec.origin else []
    locations += list(spec.submodule_search_locations or [])
    root = os.path.normcase(os.path.realpath(MODULES_DIR))
    return any(os.path.normcase(os.path.realpath(p)).startswith(root) for p in locations if p)


def _distribution_names():
    """'deep_ep 1.2.1'-style names of installed distributions that provide a deep_ep, for the warning."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return []
    found = []
    for name in ("deep_ep", "deep-ep"):
        try:
            dist = metadata.distribution(name)
        except Exception:  # PackageNotFoundError, or a broken metadata directory
            continue
        label = f"{dist.metadata['Name']} {dist.version}"
        if label not in found:
            found.append(label)
    return found


class _Finder:
    """A meta path finder for the top-level names deep_ep and deep_ep_cpp (their submodules are found through
    the package's __path__, i.e. in _modules/ when OpenEP's deep_ep was chosen)."""

    _openep_deep_ep_alias = True

    def __init__(self):
        self._decision = None  # "openep" or "other", fixed at the first import of either name
        self._lock = threading.RLock()
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _NAMES or self._searching:
            return None
        if self.decide() != "openep":
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [MODULES_DIR])

    def decide(self):
        with self._lock:
            if self._decision is None:
                self._searching = True
                try:
                    self._decision = self._choose()
                finally:
                    self._searching = False
            return self._decision

    def _choose(self):
        choice = _shadow_choice()
        if choice is True:
            return "openep"
        other = self._other_spec()
        if other is None:
            return "openep"
        if choice is None:
            name, spec = other
            where = spec.origin or ", ".join(spec.submodule_search_locations or [])
            dists = _distribution_names()
            provided = f" (installed distribution: {', '.join(dists)})" if dists else ""
            warnings.warn(
                f"OpenEP's deep_ep alias (openep-deep-ep-alias) is installed, but another {name} is importable: "
                f"{where}{provided}. `import deep_ep` and `import deep_ep_cpp` keep using it; OpenEP does not shadow "
                f"it. Set {SHADOW_ENV}=1 to use OpenEP as deep_ep instead, {SHADOW_ENV}=0 to keep the other one "
                f"without this warning, or uninstall one of the two (pip uninstall openep-deep-ep-alias).",
                RuntimeWarning, stacklevel=2)
        return "other"

    def _other_spec(self):
        """(name, spec) of a deep_ep or deep_ep_cpp that some other finder would import, or None."""
        for name in _NAMES:
            for finder in list(sys.meta_path):
                if getattr(finder, "_openep_deep_ep_alias", False):  # this finder, or another copy of it
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                try:
                    spec = find_spec(name, None)
                except Exception:  # a broken third-party finder must not break the import
                    continue
                if spec is None or spec.origin in (None, "namespace"):
                    continue  # nothing, or a bare directory named deep_ep (a namespace package): not a DeepEP
                if _is_ours(spec):
                    continue
                return name, spec
        return None


_finder = None


def install():
    """Puts the finder at the front of sys.meta_path (idempotent) and returns it. Called by the .pth file."""
    global _finder
    if _finder is None:
        _finder = _Finder()
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return _finder


def uninstall():
    """Removes the finder from sys.meta_path (modules already imported stay in sys.modules)."""
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def decision():
    """What deep_ep gives in this process: "openep", "other" (a real DeepEP), or None before the first import."""
    return None if _finder is None else _finder._decision
