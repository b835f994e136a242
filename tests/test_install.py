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


def test_no_installed_distribution_shares_a_file_or_package_with_qwen_ref():
    ours = metadata.distribution("qwen-ref")
    assert "kernels" not in _top_level(ours)
    mine = _claimed_files(ours)
    others = [d for d in metadata.distributions() if d.metadata["Name"] != "qwen-ref"]
    assert others
    for dist in others:
        assert not mine & _claimed_files(dist), dist.metadata["Name"]
        assert not OUR_PACKAGES & _top_level(dist), dist.metadata["Name"]


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
    assert not any(installed.rglob("*.nb[ic]")) and not any(home.iterdir())


def test_four_concurrent_cold_runs_share_one_cache_and_agree_bit_for_bit(installed, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    model = FIXTURES / "hd64_sharded_bf16"
    tokens = ",".join(str(t) for t in np.load(model / "reference.npz")["prompt_tokens"])

    def logits(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "qwen_ref", "logits", "--model", str(model), "--tokens", tokens, "--out", str(out)],
            env=_env(installed, home), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    cold = [logits(tmp_path / f"cold{i}.npz") for i in range(4)]  # started at once, on an empty cache
    results = [(p.wait(), p.stderr.read()) for p in cold]
    assert all(code == 0 for code, _ in results), results
    files = [(tmp_path / f"cold{i}.npz").read_bytes() for i in range(4)]
    assert all(f == files[0] for f in files[1:])
    assert any(COMPILE_NOTICE in err for _, err in results)

    cache = home / ".cache" / "qwen-ref"
    assert len(list(cache.glob("jitkernels-*/*/*.nbc"))) >= 10  # one folder, under the user's cache
    assert not any(installed.rglob("*.nb[ic]"))  # nothing beside the installed sources

    warm = logits(tmp_path / "warm.npz")
    assert warm.wait() == 0 and COMPILE_NOTICE not in warm.stderr.read()  # loads, does not compile
    assert (tmp_path / "warm.npz").read_bytes() == files[0]
