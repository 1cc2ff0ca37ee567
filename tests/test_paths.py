"""Paths that may be remote (`gs://`) go through `jdistill.paths` / etils.epath, never `open()`
or `os` file calls: a pod's workdir, `teacher.init` and TFDS_DATA_DIR live on GCS."""

import ast
import json

import pytest
from helpers.paths import REPO

from jdistill import paths

# The modules that read or write the workdir, checkpoints, teachers and prepared data.
MODULES = [
    "jdistill/train.py",
    "jdistill/checkpoint/state.py",
    "jdistill/checkpoint/damage.py",
    "jdistill/checkpoint/variables.py",
    "jdistill/metrics_writer.py",
    "jdistill/demo.py",
    "jdistill/experiment.py",
    "jdistill/main.py",
    "jdistill/data/sources.py",
    "jdistill/evaluate/coco.py",
    "jdistill/evaluate/visualize.py",
    "jdistill/evaluate/runner.py",
    "jdistill/evaluate/model.py",
    "jdistill/evaluate/score.py",
    "jdistill/evaluate/predict_images.py",
]
# Local-only file system calls: each fails on (or silently misreads) a gs:// path.
LOCAL_ONLY = {
    "open",
    "os.makedirs",
    "os.mkdir",
    "os.rename",
    "os.replace",
    "os.remove",
    "os.unlink",
    "os.listdir",
    "os.scandir",
    "os.path.exists",
    "os.path.isdir",
    "os.path.isfile",
    "os.path.getsize",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copy",
    "np.load",
    "np.save",
    "np.savez",
}


def _name(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def local_calls(source):
    """(line, name) of every call of a LOCAL_ONLY function with a path argument."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _name(node.func) in LOCAL_ONLY:
            first = node.args[0] if node.args else None
            # np.load / np.savez on an in-memory buffer are fine
            if isinstance(first, ast.Call) and _name(first.func) in ("io.BytesIO",):
                continue
            if isinstance(first, ast.Name) and first.id == "buf":
                continue
            out.append((node.lineno, _name(node.func)))
    return out


@pytest.mark.parametrize("module", MODULES)
def test_no_local_only_file_calls(module):
    calls = local_calls((REPO / module).read_text())
    assert not calls, f"{module}: use jdistill.paths / epath instead of {calls}"


def test_the_scan_finds_local_calls():
    src = "import os\nopen(p)\nos.makedirs(d)\nos.path.exists(x)\nnp.savez(buf)\nf(p)\n"
    assert local_calls(src) == [(2, "open"), (3, "os.makedirs"), (4, "os.path.exists")]


def test_absolute_keeps_uris_and_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
    assert paths.absolute("run") == str(tmp_path / "run")
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    paths.write_json(str(target), {"b": 1, "a": [2]})
    paths.write_json(str(target), {"c": 3})
    assert json.loads(target.read_text()) == {"c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
