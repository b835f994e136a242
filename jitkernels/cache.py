"""Where Numba keeps these kernels' machine code between runs, and how processes share it.

Numba's `cache=True` writes beside the source by default: into site-packages, which may be read-only
and must not be written by a running program. The kernels are cached instead in `qwen-ref/` under
`$NUMBA_CACHE_DIR` if set, else the per-user cache folder (`$XDG_CACHE_HOME`, by default `~/.cache`),
in a folder keyed by the package's version and all its sources, Numba, NumPy and Python, so a stale
callee is never loaded (Numba checks only a cached function's own file). Without a writable folder (or
HOME), every process compiles afresh and says so.

Numba's cache is not safe for concurrent writers (numba issue #4807): a function's index is read,
extended and rewritten, and its data files are numbered in that order, so two processes compiling
different signatures at once can leave the index pointing at the other's machine code. So a process
holds an exclusive `flock` on the cache folder while Numba holds its compiler lock (a signature's
lookup, compile and save): one that waits then loads what the other compiled, not compiling it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numba
import numpy
from numba.core import config, event
from numba.core.caching import UserProvidedCacheLocator

PACKAGE = Path(__file__).resolve().parent
_DISTRIBUTION = "qwen-ref"  # the distribution that ships this package: its version names the cache
_log = logging.getLogger(__package__)


def _version() -> str:
    try:
        return metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "source"  # run from a source tree that is not installed: the sources' hash still keys it


def _key() -> str:
    """Changes with any kernel source, Numba, NumPy (whose BLAS `jitkernels.blas` binds kernels to) or Python,
    so no folder ever holds two builds' code."""
    digest = hashlib.sha256(f"{numba.__version__} {numpy.__version__} {sys.version}".encode())
    for path in sorted(PACKAGE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{_version()}-{digest.hexdigest()[:16]}"


def _candidate_dir() -> Path | None:
    """The folder to cache in, under the user's NUMBA_CACHE_DIR or else the per-user cache folder."""
    root = os.environ.get("NUMBA_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):  # XDG_CACHE_HOME unset or relative: its default
        if not os.environ.get("HOME"):
            return None
        root = os.path.join(os.environ["HOME"], ".cache")
    return Path(root) / "qwen-ref" / f"jitkernels-{_key()}"


def _writable(path: Path) -> bool:
    """Whether Numba can write this package's cache files there (in the subfolder it will pick)."""
    files = path / UserProvidedCacheLocator.get_suitable_cache_subpath(str(PACKAGE / "__init__.py"))
    try:
        files.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=files).close()
    except OSError:
        return False
    return True


def _find_cache_dir() -> tuple[Path | None, str]:
    """(the folder to cache in, or None; where the kernels go, in words)."""
    candidate = _candidate_dir()
    if candidate is None:
        return None, "every run: no cache folder, HOME is not set"
    if not _writable(candidate):
        return None, f"every run: no writable cache folder ({candidate})"
    return candidate, f"first run only, cached in {candidate}"


CACHE_DIR, _WHERE = _find_cache_dir()
CACHE = CACHE_DIR is not None  # the `cache=` of every kernel's @njit


@contextmanager
def numba_cache_dir() -> Iterator[None]:
    """Kernels decorated inside this block are cached in CACHE_DIR and nowhere else.

    Numba picks a function's cache folder when the decorator runs, from its global config, trying
    its locators in turn (the next one would be the source's own folder): only the one for a
    user's folder is allowed here. The config is restored afterwards, so that other packages'
    functions keep Numba's own choice.
    """
    previous = config.CACHE_DIR, config.CACHE_LOCATOR_CLASSES
    if CACHE:
        config.CACHE_DIR, config.CACHE_LOCATOR_CLASSES = str(CACHE_DIR), UserProvidedCacheLocator.__name__
    try:
        yield
    finally:
        config.CACHE_DIR, config.CACHE_LOCATOR_CLASSES = previous


class _FolderLock(event.Listener):
    """Holds an exclusive flock on the cache folder while this process holds Numba's compiler lock.

    Numba's compiler lock is re-entrant (compiling a kernel compiles its callees inside it), so the
    folder lock is taken by the outermost acquisition only. A lock that cannot be taken (the folder
    deleted, a file system without flock) is said once and done without: a compile never fails for it.
    """

    def __init__(self, folder: Path) -> None:
        self._path = folder / "lock"
        self._fd = -1
        self._depth = 0
        self._said = False
        self._guard = threading.Lock()  # several threads may compile; Numba serialises them after this

    def on_start(self, event: event.Event) -> None:
        with self._guard:
            if self._depth == 0:
                self._fd = self._lock()
            self._depth += 1  # only once on_start cannot raise: Numba sends on_end only after it returns

    def on_end(self, event: event.Event) -> None:
        with self._guard:
            if self._depth == 0:  # a compile already running when this listener was registered
                return
            self._depth -= 1
            if self._depth == 0 and self._fd >= 0:
                os.close(self._fd)  # releases the flock
                self._fd = -1

    def _lock(self) -> int:
        """The locked file's descriptor, or -1 where it cannot be locked."""
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:  # KeyboardInterrupt while waiting, too: no descriptor left open
                os.close(fd)
                raise
            return fd
        except OSError as exc:
            if not self._said:
                self._said = True
                _log.warning(f"jitkernels: cannot lock {self._path} ({exc.strerror}): compiling without the lock")
            return -1


class _CompileNotice(event.Listener):
    """One line when this process first compiles one of these kernels (not when it loads them).

    It is a warning of the `jitkernels` logger, so Python prints it on stderr unless the program
    configured logging otherwise (`qwen-ref --quiet` raises that logger's level).
    """

    def __init__(self) -> None:
        self._said = False

    def on_start(self, event: event.Event) -> None:
        if self._said or not event.data["dispatcher"].py_func.__module__.startswith(__package__ + "."):
            return
        self._said = True
        _log.warning(f"jitkernels: compiling kernels for this CPU (tens of seconds, {_WHERE})")

    def on_end(self, event: event.Event) -> None:
        pass


def install_listeners() -> None:
    """Serialise compiles across processes (when caching) and announce the first compile."""
    if CACHE:
        event.register("numba:compiler_lock", _FolderLock(CACHE_DIR))
    event.register("numba:compile", _CompileNotice())
