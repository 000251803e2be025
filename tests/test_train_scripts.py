"""Each train_*.py stands alone: it imports library modules, never another training script."""
import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "train_*.py")))
LIBRARY = {"x3d", "x3d_kernels", "multigrid", "trainer", "kinetics_multigrid", "charades",
           "transforms", "video_io", "synthetic_data", "checkpoints", "frame_store", "progress"}


def imported_modules(path):
    """Top-level names of every module a file imports (import x.y and from x.y import z give x)."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_three_scripts_are_found():
    assert SCRIPTS == ["train_x3d_charades.py", "train_x3d_charades_loc.py",
                       "train_x3d_kinetics_multigrid.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_no_other_script_and_only_library_modules(script):
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    names = imported_modules(os.path.join(ROOT, script))
    assert not {n for n in names if n.startswith("train_") or n.startswith(".")}, script
    assert names & local <= LIBRARY, (script, sorted(names & local - LIBRARY))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_with_only_the_library_beside_it(script, tmp_path):
    """Copied alone with the library modules (no other script), its --help works."""
    for name in sorted(LIBRARY) + [os.path.splitext(script)[0]]:
        shutil.copy(os.path.join(ROOT, name + ".py"), tmp_path)
    run = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert run.returncode == 0, run.stderr
    assert "--cosine-batch-factor" in run.stdout and "--demo" in run.stdout
