"""What a plain `pip install .` ships: every config the CLI reads (tgpo_jax/configs, linked from the
repository's configs/) and the CPU kernel's source; `configs/...` paths resolve to the bundled copy
from any working directory. (.ci/run also installs the package into a clean venv and runs the demo.)"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tgpo_jax import bundled

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files_under(root: str) -> set[str]:
    out = set()
    for d, _, files in os.walk(root):
        out.update(
            os.path.relpath(os.path.join(d, f), REPO).replace(os.sep, "/") for f in files if not f.endswith(".pyc")
        )
    return out


def test_repository_configs_link_to_the_package_data():
    assert os.path.islink(os.path.join(REPO, "configs"))
    assert os.path.samefile(os.path.join(REPO, "configs"), bundled.CONFIG_DIR)


@pytest.mark.slow
def test_wheel_holds_every_bundled_config_and_kernel_source(tmp_path):
    # built from a copy without build/ (setuptools' staging folder would carry files of earlier builds)
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("tgpo_jax-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = _files_under(os.path.join(REPO, "tgpo_jax", "configs"))
    wanted |= _files_under(os.path.join(REPO, "tgpo_jax", "kernels", "cpu_kernels"))
    assert len(wanted) > 20  # demo/experiment/estimate configs, presets, sweeps, hf_configs, kernel
    assert sorted(wanted - shipped) == []


def test_configs_paths_resolve_to_the_bundled_copy_from_any_directory(tmp_path, monkeypatch):
    from tgpo_jax.configtree import load_yaml

    monkeypatch.chdir(tmp_path)
    assert bundled.resolve_config("configs/demo.yaml") == os.path.join(bundled.CONFIG_DIR, "demo.yaml")
    assert load_yaml("configs/demo.yaml") == load_yaml(os.path.join(REPO, "configs", "demo.yaml"))
    # a file of the working directory wins over the bundled one of the same name
    os.makedirs("configs")
    with open("configs/demo.yaml", "w") as f:
        f.write("run_dir: mine\n")
    assert load_yaml("configs/demo.yaml") == {"run_dir": "mine"}
    # other missing paths stay as given, and the error names them
    assert bundled.resolve_config("configs/nope.yaml") == "configs/nope.yaml"
    assert bundled.resolve_config("elsewhere/demo.yaml") == "elsewhere/demo.yaml"
