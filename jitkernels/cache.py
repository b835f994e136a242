"""Where Numba keeps these kernels' machine code between runs, and how processes share it.

Numba's `cache=True` writes beside the source by default: into site-packages for a regular install,
which may be read-only and must not be written by a running program. The kernels are cached instead
in `$NUMBA_CACHE_DIR` if the user set it, else in a per-user folder keyed by the package's version
and sources, Numba and Python (`$XDG_CACHE_HOME/qwen-ref/...`, by default under `~/.cache`). A key
that changes with any kernel source also means a stale callee can never be loaded: Numba itself
checks only the file a cached function is written in. Where no folder is writable, the kernels
compile afresh in every process, and the first compile says so on stderr.

Numba's cache is not safe for concurrent writers (numba issue #4807): a function's index is read,
extended and rewritten, and its data files are numbered in that order, so two processes compiling
different signatures at once can leave the index pointing at the other's machine code. So every
process holds an exclusive `flock` on the cache folder whenever Numba holds its compiler lock
(which covers a signature's cache lookup, compile and save). A process that waits then loads what
the other compiled instead of compiling it again.
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
from numba.core import config, event

PACKAGE = Path(__file__).resolve().parent
_DISTRIBUTION = "qwen-ref"  # the distribution that ships this package: its version names the cache


def _version() -> str:
    try:
        return metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "source"  # run from a source tree that is not installed: the sources' hash still keys it


def _key() -> str:
    """Changes with any kernel source, Numba or Python, so no folder ever holds two builds' code."""
    digest = hashlib.sha256(f"{numba.__version__} {sys.version}".encode())
    for path in sorted(PACKAGE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{_version()}-{digest.hexdigest()[:16]}"


def _candidate_dir() -> Path | None:
    """The folder to cache in: the user's NUMBA_CACHE_DIR, else the per-user cache folder."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset or relative: the XDG default
        home = os.path.expanduser("~")
        if home == "~":  # no HOME and no password entry
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "qwen-ref" / f"jitkernels-{_key()}"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _find_cache_dir() -> tuple[Path | None, Path | None]:
    """(the folder to cache in or None, the folder that was tried)."""
    candidate = _candidate_dir()
    return (candidate if candidate is not None and _writable(candidate) else None), candidate


CACHE_DIR, _TRIED = _find_cache_dir()
CACHE = CACHE_DIR is not None  # the `cache=` of every kernel's @njit


@contextmanager
def numba_cache_dir() -> Iterator[None]:
    """Kernels decorated inside this block are cached in CACHE_DIR.

    Numba picks a function's cache folder when the decorator runs, from its global config; the
    config is restored afterwards so that other packages' functions keep Numba's own choice.
    """
    previous = config.CACHE_DIR
    config.CACHE_DIR = str(CACHE_DIR) if CACHE else previous
    try:
        yield
    finally:
        config.CACHE_DIR = previous


class _FolderLock(event.Listener):
    """Holds an exclusive flock on the cache folder while this process holds Numba's compiler lock.

    Numba's compiler lock is re-entrant (compiling a kernel compiles its callees inside it), so the
    folder lock is taken by the outermost acquisition only.
    """

    def __init__(self, folder: Path) -> None:
        self._path = folder / "lock"
        self._fd = -1
        self._depth = 0
        self._guard = threading.Lock()  # several threads may compile; Numba serialises them after this

    def on_start(self, event: event.Event) -> None:
        with self._guard:
            self._depth += 1
            if self._depth == 1:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)

    def on_end(self, event: event.Event) -> None:
        with self._guard:
            self._depth -= 1
            if self._depth == 0:
                os.close(self._fd)  # releases the flock


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
        if CACHE:
            where = f"first run only, cached in {CACHE_DIR}"
        else:
            where = f"every run: no writable cache folder ({_TRIED or 'HOME is not set'})"
        logging.getLogger(__package__).warning(f"jitkernels: compiling kernels for this CPU (~20 s, {where})")

    def on_end(self, event: event.Event) -> None:
        pass


def install_listeners() -> None:
    """Serialise compiles across processes (when caching) and announce the first compile."""
    if CACHE:
        event.register("numba:compiler_lock", _FolderLock(CACHE_DIR))
    event.register("numba:compile", _CompileNotice())
