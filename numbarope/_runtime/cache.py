"""Where numba caches numbarope's kernels, so that read-only installs import.

Every kernel is ``@njit(cache=True)``. numba picks the cache directory of a
function when it is decorated, i.e. when its module is imported, from the first
usable of (``numba/core/caching.py``, ``_CacheImpl._locator_classes``):

1. ``numba.config.CACHE_DIR`` (the ``NUMBA_CACHE_DIR`` environment variable,
   read once when numba is imported);
2. the package's own ``__pycache__``;
3. the user-wide cache dir (``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``);

each kept only if a file can be written in it. With none usable the decorator
raises ``RuntimeError: cannot cache function ...: no locator available``.
:func:`configure_numba_cache` runs before the kernel modules are imported and,
when 2 and 3 are not writable and the user has not chosen a directory, sets
``numba.config.CACHE_DIR`` to a private per-user temp dir. Setting
``os.environ["NUMBA_CACHE_DIR"]`` instead would do nothing once numba is
imported (until the compiler's ``reload_config``, which runs after the
decorator has chosen), and would make that reload re-read every ``NUMBA_*``
variable, discarding values a user set in ``numba.config`` directly.

The setting is numba-wide: in such a process, functions of other packages
decorated later are also cached in the temp dir (where they would otherwise
have used 2 or 3 if writable). If no temp dir is writable either, numbarope's
kernels are compiled in memory in every process (numba's caching is left on
for everything else) and one :class:`NumbaCacheWarning` says how to get a
persistent cache.
"""

import os
import stat
import tempfile
import warnings

__all__ = ["NumbaCacheWarning", "configure_numba_cache"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # numbarope/
_PACKAGE = __name__.split(".")[0]


class NumbaCacheWarning(UserWarning):
    """numba cannot cache numbarope's compiled kernels on disk."""


def _writable_dir(path):
    """numba's own test (``_CacheLocator.ensure_cache_path``): create, write a file."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _user_tag():
    if hasattr(os, "getuid"):
        return str(os.getuid())
    import getpass
    try:
        return getpass.getuser()
    except Exception:   # no user name available (e.g. no USERNAME on Windows)
        return "user"


def private_temp_dir():
    """Per-user ``<tempdir>/numbarope-numba-cache-<uid>`` (mode 0700), or None.

    numba's index files are pickles, loaded on import: a directory that another
    user owns or can write to, or a symlink, is refused.
    """
    try:
        base = tempfile.gettempdir()
    except OSError:                 # FileNotFoundError: no usable temp dir
        return None
    path = os.path.join(base, f"numbarope-numba-cache-{_user_tag()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return None
    return path if _writable_dir(path) else None


def _default_locator_writable():
    """Would numba's in-tree or user-wide locator work for this package's files?"""
    if all(_writable_dir(os.path.join(_PACKAGE_DIR, *d, "__pycache__"))
           for d in (("ops",), ("ops", "streaming"))):
        return True
    from numba.core.caching import _CacheLocator
    from numba.misc.appdirs import AppDirs
    user_dir = AppDirs(appname="numba", appauthor=False).user_cache_dir
    sub = _CacheLocator.get_suitable_cache_subpath(
        os.path.join(_PACKAGE_DIR, "ops", "streaming", "kernel.py"))
    return _writable_dir(os.path.join(user_dir, sub))


def _compile_package_in_memory():
    """Leave this package's dispatchers with numba's NullCache (no disk at all).

    ``cache=True`` cannot be turned off from outside the decorator, and a cache
    with no writable directory fails at decoration or at the first save; so
    ``Dispatcher.enable_caching`` skips functions of this package.
    """
    from numba.core.dispatcher import Dispatcher
    original = Dispatcher.enable_caching
    if getattr(original, "_numbarope_in_memory", False):
        return
    prefix = _PACKAGE + "."

    def enable_caching(self):
        if getattr(self.py_func, "__module__", "").startswith(prefix):
            return
        original(self)

    enable_caching._numbarope_in_memory = True
    Dispatcher.enable_caching = enable_caching


def configure_numba_cache():
    """Give numba a writable cache directory for this package's kernels.

    Must run before the kernel modules are imported. Does nothing when the user
    chose (``NUMBA_CACHE_DIR``, ``numba.config.CACHE_DIR``,
    ``NUMBA_CACHE_LOCATOR_CLASSES``), when the JIT is disabled, or when numba's
    default locators can write.

    Returns
    -------
    str or None
        The temp cache directory set in ``numba.config.CACHE_DIR``, else None.

    Warns
    -----
    NumbaCacheWarning
        Once, when no directory at all is writable and the kernels are compiled
        in memory in every process.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    from numba.core import config
    if config.CACHE_DIR or config.CACHE_LOCATOR_CLASSES or config.DISABLE_JIT:
        return None
    if _default_locator_writable():
        return None
    path = private_temp_dir()
    if path is not None:
        config.CACHE_DIR = path
        return path
    _compile_package_in_memory()
    warnings.warn(
        f"numba cannot write a cache for numbarope's kernels (read-only "
        f"{_PACKAGE_DIR}, user cache dir and temp dir); they are compiled in every "
        f"process. Set NUMBA_CACHE_DIR to a writable directory to cache them.",
        NumbaCacheWarning, stacklevel=2)
    return None
