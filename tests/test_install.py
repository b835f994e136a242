"""qwen-ref installs beside transformers and Hugging Face's `kernels` without sharing a file, runs from
a read-only install, never writes its compiled kernels into site-packages, and lets concurrent cold
processes share one kernel cache."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from helpers import FIXTURES

REPO = Path(__file__).resolve().parent.parent
OUR_PACKAGES = {"jitkernels", "qwen_ref"}
COMPILE_NOTICE = "jitkernels: compiling kernels for this CPU"


def _top_level(dist: metadata.Distribution) -> set[str]:
    """The top-level import names whose files a distribution's RECORD lists."""
    return {PurePosixPath(f).parts[0] for f in dist.files or [] if PurePosixPath(f).suffix == ".py"}


def _claimed_files(dist: metadata.Distribution) -> set[Path]:
    return {Path(dist.locate_file(f)).resolve() for f in dist.files or []}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """qwen-ref installed (not editable) into a folder of its own, to be put first on PYTHONPATH."""
    target = tmp_path_factory.mktemp("install") / "site"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(REPO)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    return target


def _relative_files(dist: metadata.Distribution) -> set[PurePosixPath]:
    return {PurePosixPath(f) for f in dist.files or []}


def test_no_installed_distribution_shares_a_file_or_package_with_qwen_ref(installed):
    # a regular install's RECORD (a developer's editable install lists only a finder and a .pth)
    ours = next(metadata.distributions(path=[str(installed)]))
    assert ours.metadata["Name"] == "qwen-ref" and _top_level(ours) == OUR_PACKAGES
    others = [d for d in metadata.distributions() if d.metadata["Name"] != "qwen-ref"]
    assert any(d.metadata["Name"] == "numba" for d in others)
    for dist in others:  # their RECORDs, relative to site-packages as ours is to its folder
        assert not _relative_files(ours) & _relative_files(dist), dist.metadata["Name"]
        assert not OUR_PACKAGES & _top_level(dist), dist.metadata["Name"]
    # and the qwen-ref this environment has installed (in CI a regular install, as the README's)
    mine = _claimed_files(metadata.distribution("qwen-ref"))
    for dist in others:
        assert not mine & _claimed_files(dist), dist.metadata["Name"]


def test_jitkernels_is_ours_and_hub_kernels_still_imports(torch_reference):
    # transformers >= 5.25 imports Hugging Face's `kernels` package; ours must not stand in its way
    code = (
        "import jitkernels, transformers.integrations.hub_kernels\n"
        "print(jitkernels.__file__)\n"
        "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ours, hub = run.stdout.split()
    assert Path(ours).parent.name == "jitkernels"
    if any(r.split(";")[0].strip().startswith("kernels") for r in metadata.requires("transformers") or []):
        hub_files = _claimed_files(metadata.distribution("kernels"))
        assert Path(hub).resolve() in hub_files  # the hub's own package, not one of ours


def test_pip_check_is_clean():
    run = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _env(installed: Path, home: Path) -> dict[str, str]:
    """The environment of a user whose only cache setting is HOME (run it outside the repo: python puts
    the working folder first on sys.path, ahead of PYTHONPATH's install)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(installed), HOME=str(home))
    return env


def test_read_only_install_and_home_run_selfcheck_with_one_notice(installed, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    site_packages = sysconfig.get_paths()["purelib"]
    read_only = [str(installed), str(home), site_packages]
    # A private mount namespace (as root, or as a user mapped to root) makes the folders read-only
    # for this command alone; file permissions would not stop root, which CI runs as.
    script = " && ".join(
        [f"mount --bind '{p}' '{p}' && mount -o remount,bind,ro '{p}'" for p in read_only]
        + [f"{sys.executable} -c 'import jitkernels, qwen_ref; print(jitkernels.__file__, qwen_ref.__file__)'",
           f"exec {sys.executable} -m qwen_ref selfcheck"]
    )
    run = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script],
                         env=_env(installed, home), cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    loaded_from = run.stdout.splitlines()[0].split()
    assert all(path.startswith(str(installed)) for path in loaded_from), loaded_from
    assert "selfcheck passed" in run.stdout
    notices = [line for line in run.stderr.splitlines() if COMPILE_NOTICE in line]
    assert len(notices) == 1 and "no writable cache folder" in notices[0], run.stderr


def test_four_concurrent_cold_runs_share_one_cache_and_agree_bit_for_bit(installed, tmp_path):
    # Four identical runs, and beside them runs in other dtypes, whose kernels compile other
    # signatures of the same functions at the same time (what Numba's own cache gets wrong).
    home = tmp_path / "home"
    home.mkdir()
    models = ["hd64_sharded_bf16"] * 4 + ["mqa_f16"] * 2 + ["mha_f32_untied"] * 2

    def logits(case: str, out: Path) -> subprocess.Popen:
        tokens = ",".join(str(t) for t in np.load(FIXTURES / case / "reference.npz")["prompt_tokens"])
        return subprocess.Popen(
            [sys.executable, "-m", "qwen_ref", "logits", "--model", str(FIXTURES / case), "--tokens", tokens,
             "--out", str(out)],
            env=_env(installed, home), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    cold = [logits(case, tmp_path / f"cold{i}.npz") for i, case in enumerate(models)]  # at once, on an empty cache
    errors = [p.communicate()[1] for p in cold]
    results = [(p.returncode, err) for p, err in zip(cold, errors)]
    assert all(code == 0 for code, _ in results), results
    assert any(COMPILE_NOTICE in err for _, err in results)
    files = [(tmp_path / f"cold{i}.npz").read_bytes() for i in range(len(models))]
    assert files[0] == files[1] == files[2] == files[3] and files[4] == files[5] and files[6] == files[7]

    cache = home / ".cache" / "qwen-ref"
    assert len(list(cache.glob("jitkernels-*/*/*.nbc"))) >= 10  # one folder, under the user's cache
    assert not any(installed.rglob("*.nb[ic]"))  # nothing beside the installed sources

    for i in (0, 4, 6):  # warm runs load what the cold ones saved: the same machine code, the same logits
        warm = logits(models[i], tmp_path / "warm.npz")
        _, err = warm.communicate()
        assert warm.returncode == 0 and COMPILE_NOTICE not in err, err
        assert (tmp_path / "warm.npz").read_bytes() == files[i], models[i]


_PROBE = """
import fcntl, os
import numpy as np
from numba.core import event
import jitkernels
from jitkernels import cache

def held() -> bool:
    fd = os.open(cache.CACHE_DIR / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: conflicts with the folder lock
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)

seen = []
class Probe(event.Listener):
    def on_start(self, ev): seen.append(held())
    def on_end(self, ev): pass

event.register("numba:compile", Probe())
jitkernels.rms_norm(np.ones((2, 8), np.float32), np.ones(8, np.float32), 1e-6)
print(len(seen), all(seen), held())
"""


def test_the_cache_folder_is_locked_while_kernels_compile_and_released_after(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    run = subprocess.run([sys.executable, "-c", _PROBE], env={**env, "NUMBA_CACHE_DIR": str(tmp_path)},
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    compiles, all_held, held_after = run.stdout.split()
    assert int(compiles) >= 1 and all_held == "True" and held_after == "False"
    assert list(tmp_path.glob("qwen-ref/jitkernels-*/lock"))  # under NUMBA_CACHE_DIR, keyed


def test_without_home_kernels_run_uncached_and_quiet_hides_the_notice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "HOME")}
    command = [sys.executable, "-m", "qwen_ref", "generate", "--model", str(FIXTURES / "mqa_f16"),
               "--tokens", "1,2,3", "--max-new-tokens", "2", "--temperature", "0"]
    # both at once: each compiles every kernel it runs (nothing can be cached), one compiler per core
    loud, quiet = (subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for c in (command, command + ["--quiet"]))
    (loud_out, loud_err), (quiet_out, quiet_err) = loud.communicate(), quiet.communicate()
    assert loud.returncode == 0, loud_err
    assert f"{COMPILE_NOTICE} (tens of seconds, every run: no cache folder, HOME is not set)" in loud_err
    assert quiet.returncode == 0 and quiet_err == "" and quiet_out == loud_out, quiet_err
