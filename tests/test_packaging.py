"""Packaging: one `lockstep` namespace, a wheel that owns no generic name, a plugin that costs nothing."""
from __future__ import annotations

import importlib.metadata
import os
import re
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

import lockstep

REPO = Path(__file__).resolve().parent.parent


def _run(*cmd: str | Path, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_wheel(source: Path, out: Path) -> Path:
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", out, source, cwd=out)
    (path,) = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


def _other_distribution(root: Path) -> Path:
    """A wheel of a throwaway distribution that owns the generic top-level `engine` and `ci`."""
    for package in ("engine", "ci"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f"OWNER = 'otherdist.{package}'\n")
    (root / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "otherdist"
        version = "1.0"
        [tool.setuptools]
        packages = ["engine", "ci"]
    """))
    return _build_wheel(root, root)


def _site_dirs_of_this_environment() -> list[str]:
    """Where this interpreter's packages (torch above all) live: a venv's, a conda env's or the
    system's site-packages, and the user site where ``pip install --user`` puts them."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A venv with the Lockstep *wheel* installed that sees this environment's packages.

    Not ``system_site_packages``: that is the *base* interpreter's site-packages, which lacks
    torch whenever the tests run from a venv (the README's setup). A ``.pth`` file appends this
    environment's site directories after the venv's own, so the wheel shadows any editable
    install here (a plain path line runs none of that directory's ``.pth`` hooks)."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    own_site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=root).strip()
    Path(own_site, "lockstep_test_outer_env.pth").write_text(
        "".join(f"{d}\n" for d in _site_dirs_of_this_environment()))
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel, cwd=root)
    return root


def test_the_wheel_installs_only_the_lockstep_and_sync_guard_names(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lockstep", "sync_guard"}
    for required in ("lockstep/__init__.py", "lockstep/__main__.py", "lockstep/py.typed",
                     "sync_guard/py.typed", "lockstep/engine/core.py", "lockstep/ci/cli.py",
                     "lockstep/property_tests/__init__.py", "sync_guard/pytest_plugin.py"):
        assert required in names
    assert not [n for n in names if n.startswith("lockstep/tests/")], "tests are not installed"


def test_the_wheel_works_from_outside_the_checkout(fresh_venv, tmp_path):
    python, env = fresh_venv / "bin" / "python", {**os.environ, "PYTHONPATH": ""}
    where = _run(python, "-c", "import lockstep, sync_guard; print(lockstep.__file__); "
                 "print(sync_guard.__file__); from lockstep import LLM, SamplingParams",
                 cwd=tmp_path, env=env).split()
    assert all(str(fresh_venv) in path for path in where), where
    assert _run(fresh_venv / "bin" / "lockstep", "--version", cwd=tmp_path, env=env).strip() \
        == f"lockstep {lockstep.__version__}"
    assert _run(python, "-m", "lockstep", "--version", cwd=tmp_path, env=env).strip() \
        == f"lockstep {lockstep.__version__}"


def test_a_distribution_owning_engine_and_ci_installs_and_uninstalls_beside_lockstep(
        fresh_venv, tmp_path):
    python, env = fresh_venv / "bin" / "python", {**os.environ, "PYTHONPATH": ""}
    other = _other_distribution(tmp_path / "otherdist")
    both = ("import engine, ci; print(engine.OWNER, ci.OWNER); "
            "from lockstep import LLM, SamplingParams; "
            "out = LLM(model='oracle').generate([[3, 4, 5]], SamplingParams(max_tokens=3))[0]; "
            "print(len(out.token_ids))")
    pip = (python, "-m", "pip", "-q")
    _run(*pip, "install", "--no-deps", other, cwd=tmp_path, env=env)
    assert _run(python, "-c", both, cwd=tmp_path, env=env).split() == \
        ["otherdist.engine", "otherdist.ci", "3"]
    _run(*pip, "uninstall", "-y", "otherdist", cwd=tmp_path, env=env)
    assert _run(python, "-c", "import lockstep.engine, lockstep.ci.cli; print('ok')",
                cwd=tmp_path, env=env).strip() == "ok"
    # and the other way round: removing Lockstep leaves the other distribution's packages whole
    _run(*pip, "install", "--no-deps", other, cwd=tmp_path, env=env)
    _run(*pip, "uninstall", "-y", "lockstep", cwd=tmp_path, env=env)
    assert _run(python, "-I", "-c", "import engine, ci; print(engine.OWNER, ci.OWNER)",
                cwd=tmp_path).split() == ["otherdist.engine", "otherdist.ci"]


def test_the_version_is_one_value_everywhere():
    assert importlib.metadata.version("lockstep") == lockstep.__version__
    out = _run(sys.executable, "-m", "lockstep", "--version", cwd=REPO)
    assert out.strip() == f"lockstep {lockstep.__version__}"


TORCH_FREE_CONFTEST = """
import sys
def pytest_sessionfinish(session):
    plugin = session.config.pluginmanager.has_plugin("sync_guard.pytest_plugin")
    with open("report.txt", "w") as f:
        f.write(f"plugin={plugin} torch={'torch' in sys.modules}")
"""


@pytest.mark.parametrize("marked, torch_imported", [(False, False), (True, True)])
def test_the_plugin_imports_torch_only_once_a_nosync_test_runs(tmp_path, marked, torch_imported):
    (tmp_path / "conftest.py").write_text(TORCH_FREE_CONFTEST)
    mark = "@pytest.mark.nosync\n" if marked else ""
    (tmp_path / "test_plain.py").write_text(f"import pytest\n{mark}def test_sum():\n"
                                            "    assert sum([1, 2]) == 3\n")
    _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=tmp_path)
    assert (tmp_path / "report.txt").read_text() == f"plugin=True torch={torch_imported}"


def _cited_paths(text: str) -> set[str]:
    cited = set()
    for span in re.findall(r"`([^`\s]+)`", text):
        # a path in the repository: has a folder part, or names another doc
        if re.fullmatch(r"[\w.-]+/[\w./-]*|[\w.-]+\.md", span):
            cited.add(span.rstrip("/"))
    return cited


def test_the_docs_cite_only_files_in_the_repository():
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for path in _cited_paths(doc.read_text()):
            if not ((REPO / path).exists() or (doc.parent / path).exists()):
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, "docs cite files that do not exist:\n" + "\n".join(missing)
