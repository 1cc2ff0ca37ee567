"""Checkpoints you can trust: damaged steps fall back to the newest step that restores (moved
aside on resume, left alone when only reading), another model's workdir is one clear error, and
damaged or non-float weight files are refused by name.

The checkpoints are tiny but real: `checkpoint.save` of a small pytree (with an optax state, as
a training state has), damaged on disk the way crashes, full disks and bad copies damage them.
"""

import asyncio
import gc
import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdistill import checkpoint
from jdistill.checkpoint import damage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (1, 2, 3)
# Large enough (16 KiB of random floats) that ocdbt stores the array in its own data file
# rather than inline in the b-tree node.
KERNEL = (64, 64)


def make_state(step, kernel=KERNEL):
    params = {
        "student": {
            "conv": {
                "kernel": jnp.asarray(np.random.default_rng(step).normal(size=kernel), jnp.float32)
            },
            "bn": {"scale": jnp.ones((8,), jnp.float32)},
        },
        "adapters": {},
    }
    return {
        "step": jnp.int32(step),
        "params": params,
        "batch_stats": {"bn": {"mean": jnp.full((8,), float(step), jnp.float32)}},
        "opt_state": optax.sgd(0.1, momentum=0.9).init(params),
    }


def abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def write_steps(directory, steps=STEPS, kernel=KERNEL):
    mgr = checkpoint.manager(directory, keep=10)
    for step in steps:
        checkpoint.save(mgr, step, make_state(step, kernel), {"pos": step}, {"family": "x"})
        mgr.wait_until_finished()
    mgr.close()
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Steps 1..3 written once; each test damages its own copy."""
    return write_steps(str(tmp_path_factory.mktemp("pristine") / "checkpoints"))


@pytest.fixture
def ckpts(pristine, tmp_path):
    directory = str(tmp_path / "run" / "checkpoints")
    shutil.copytree(pristine, directory)
    return directory


def tree_listing(folder):
    """Every path under `folder` with its size and modification time."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            st = os.stat(os.path.join(root, name))
            out.append((os.path.relpath(os.path.join(root, name), folder), st.st_size, st.st_mtime))
    return sorted(out)


def largest_file(folder):
    files = [f for f in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


# Each damages step 3 of `directory`; returns the name the damaged step folder has on disk.
def truncate_array_file_at(directory, step):
    data = largest_file(os.path.join(directory, str(step), "state"))
    assert os.path.getsize(data) > np.prod(KERNEL) * 4 // 2  # really the kernel's data file
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


def truncate_array_file(directory):
    truncate_array_file_at(directory, 3)
    return "3"


def delete_array_file(directory):
    os.remove(largest_file(os.path.join(directory, "3", "state")))
    return "3"


def garbage_iterator_state(directory):
    with open(os.path.join(directory, "3", "data", "metadata"), "w") as f:
        f.write("{not json")
    return "3"


def missing_ocdbt_manifest(directory):
    os.remove(os.path.join(directory, "3", "state", "manifest.ocdbt"))
    return "3"


def missing_tree_metadata(directory):
    os.remove(os.path.join(directory, "3", "state", "_METADATA"))
    return "3"


def empty_step_folder(directory):
    shutil.rmtree(os.path.join(directory, "3"))
    os.mkdir(os.path.join(directory, "3"))
    return "3"


def half_written_tmp_dir(directory):
    # What an interrupted save leaves: orbax writes `<step>.orbax-checkpoint-tmp-<n>` and renames
    # it only once complete.
    name = "3.orbax-checkpoint-tmp-1700000000123456"
    os.rename(os.path.join(directory, "3"), os.path.join(directory, name))
    os.remove(os.path.join(directory, name, "state", "_METADATA"))
    return name


DAMAGE = [
    truncate_array_file,
    delete_array_file,
    garbage_iterator_state,
    missing_ocdbt_manifest,
    missing_tree_metadata,
    empty_step_folder,
    half_written_tmp_dir,
]


def warnings_about(caplog, folder):
    """jdistill's log lines that name `folder` (orbax adds its own one-liner when a step has no
    `_CHECKPOINT_METADATA`; that is not ours to count)."""
    return [
        r.getMessage()
        for r in caplog.records
        if folder in r.getMessage()
        and os.path.samefile(os.path.dirname(r.pathname), os.path.dirname(checkpoint.__file__))
    ]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_resume_falls_back_past_a_damaged_latest_step(ckpts, damage, caplog, capfd):
    name = damage(ckpts)
    folder = os.path.join(ckpts, name)
    mgr = checkpoint.manager(ckpts, keep=10)
    with caplog.at_level(logging.WARNING):
        step, state, data_state, meta = checkpoint.restore_newest(mgr, abstract(make_state(0)))
    assert step == 2 and int(state["step"]) == 2
    np.testing.assert_array_equal(
        state["params"]["student"]["conv"]["kernel"],
        make_state(2)["params"]["student"]["conv"]["kernel"],
    )
    assert data_state == {"pos": 2} and meta == {"family": "x"}
    # one warning line names the damaged folder and where it went
    (message,) = warnings_about(caplog, folder)
    assert "\n" not in message and "moved it aside" in message and "step 2" in message
    # kept, not deleted: moved into checkpoints/damaged/
    assert not os.path.exists(folder)
    (kept,) = os.listdir(os.path.join(ckpts, checkpoint.DAMAGED_DIR))
    assert kept.startswith(name + ".") and kept in message
    # orbax's spec dumps of the abandoned reads do not reach the terminal
    assert "Exception ignored" not in capfd.readouterr().err
    # the manager no longer lists it, and the run can save step 3 again and resume from it
    assert mgr.all_steps() == [1, 2]
    checkpoint.save(mgr, 3, make_state(3), {"pos": 3}, {"family": "x"})
    mgr.wait_until_finished()
    mgr.close()
    mgr = checkpoint.manager(ckpts, keep=10)
    step, state, data_state, _ = checkpoint.restore_newest(mgr, abstract(make_state(0)))
    assert step == 3 and data_state == {"pos": 3}
    mgr.close()


def test_cause_in_the_warning_says_what_is_wrong(ckpts, caplog):
    truncate_array_file(ckpts)
    mgr = checkpoint.manager(ckpts, keep=10)
    with caplog.at_level(logging.WARNING):
        checkpoint.restore_newest(mgr, abstract(make_state(0)))
    (message,) = warnings_about(caplog, os.path.join(ckpts, "3"))
    # tensorstore's status names the array and the fault, not orbax's spec dump
    assert "params.student.conv.kernel" in message and "tensorstore_spec" not in message
    assert len(message) < 800


def test_missing_checkpoint_metadata_file_is_harmless(ckpts, caplog):
    # `_CHECKPOINT_METADATA` only records timing; orbax restores without it, so nothing is
    # damaged and nothing is moved.
    os.remove(os.path.join(ckpts, "3", "_CHECKPOINT_METADATA"))
    mgr = checkpoint.manager(ckpts, keep=10)
    with caplog.at_level(logging.WARNING):
        step, _, data_state, _ = checkpoint.restore_newest(mgr, abstract(make_state(0)))
    assert step == 3 and data_state == {"pos": 3}
    assert not warnings_about(caplog, ckpts)
    assert not os.path.exists(os.path.join(ckpts, checkpoint.DAMAGED_DIR))


def test_every_step_damaged_is_one_error_and_nothing_is_moved(ckpts):
    for step in STEPS:
        os.remove(os.path.join(ckpts, str(step), "state", "manifest.ocdbt"))
    mgr = checkpoint.manager(ckpts, keep=10)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore_newest(mgr, abstract(make_state(0)))
    lines = str(e.value).splitlines()
    assert ckpts in lines[0] and "can be restored" in lines[0]
    for step in STEPS:  # one line per step, each with its cause
        (line,) = [ln for ln in lines if ln.strip().startswith(os.path.join(ckpts, str(step)))]
        assert "NOT_FOUND" in line
    assert "--workdir" in lines[-1]
    # left as found: a relaunch must not find an empty folder and silently train from scratch
    assert mgr.all_steps() == list(STEPS)
    assert not os.path.exists(os.path.join(ckpts, checkpoint.DAMAGED_DIR))


def test_no_steps_restores_nothing(tmp_path):
    mgr = checkpoint.manager(str(tmp_path / "checkpoints"))
    assert checkpoint.restore_newest(mgr, abstract(make_state(0))) == (None, None, None, None)


def test_another_models_workdir_is_one_clear_error_without_fallback(ckpts):
    other = make_state(0, kernel=(32, 64))
    other["params"]["student"]["head"] = {"bias": jnp.zeros((4,), jnp.float32)}
    other["opt_state"] = optax.sgd(0.1, momentum=0.9).init(other["params"])
    mgr = checkpoint.manager(ckpts, keep=10)
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.restore_newest(mgr, abstract(other))
    msg = str(e.value)
    assert os.path.join(ckpts, "3") in msg and "different model or config" in msg
    assert (
        "shape mismatch: params/student/conv/kernel: checkpoint (64, 64) vs model (32, 64)" in msg
    )
    assert "missing key: params/student/head/bias" in msg
    assert "fresh --workdir" in msg
    assert "partial_restore" not in msg
    assert mgr.all_steps() == list(STEPS)  # nothing tried older, nothing moved
    assert not os.path.exists(os.path.join(ckpts, checkpoint.DAMAGED_DIR))


def test_mismatch_message_stays_short_for_a_big_model(ckpts):
    other = make_state(0)
    other["params"]["student"] = {f"layer{i}": {"kernel": jnp.zeros((3,))} for i in range(200)}
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.restore_newest(checkpoint.manager(ckpts), abstract(other))
    assert "more" in str(e.value) and len(str(e.value).splitlines()) < 15


def test_a_transient_error_is_raised_not_called_damage(ckpts, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(checkpoint.state, "restore", out_of_memory)
    mgr = checkpoint.manager(ckpts, keep=10)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        checkpoint.restore_newest(mgr, abstract(make_state(0)))
    assert mgr.all_steps() == list(STEPS)  # a good checkpoint is never set aside for it


def test_asyncio_reports_of_abandoned_orbax_reads_go_to_the_debug_log(caplog):
    # When orbax's read of a step ends on its first failed array, a read that failed in that
    # same loop iteration is never retrieved, and asyncio reports it (some 80 lines each) when
    # the task is collected. Which reads those are depends on timing, so the test makes the
    # same report deterministically: orbax's own read coroutine, failing, never awaited.
    from orbax.checkpoint._src.serialization import serialization

    async def not_orbax():
        raise ValueError("a task of someone else's")

    with damage.quiet_failed_reads():  # installs the filters (for the life of the process)
        pass
    loop = asyncio.new_event_loop()
    tasks = [
        loop.create_task(serialization.async_deserialize(None, {})),  # fails: no sharding
        loop.create_task(not_orbax()),
    ]
    with caplog.at_level(logging.DEBUG):
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()
        assert all(t.done() for t in tasks)
        del tasks
        gc.collect()
    shown = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(shown) == 1 and "not_orbax" in shown[0]  # anything else is still reported
    (debug,) = [m for m in map(logging.LogRecord.getMessage, caplog.records) if "read:" in m]
    assert "Task exception was never retrieved" in debug and "sharding" in debug
    assert "\n" not in debug


# ---------------------------------------------------------------- load_model_variables


@pytest.mark.parametrize("given", ["workdir", "checkpoints"])
def test_reading_a_model_skips_a_damaged_step_and_moves_nothing(ckpts, given, caplog):
    truncate_array_file(ckpts)
    before = tree_listing(ckpts)
    path = os.path.dirname(ckpts) if given == "workdir" else ckpts
    with caplog.at_level(logging.WARNING):
        variables, meta = checkpoint.load_model_variables(path)
    np.testing.assert_array_equal(
        variables["params"]["conv"]["kernel"],
        make_state(2)["params"]["student"]["conv"]["kernel"],
    )
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.full((8,), 2.0))
    assert meta == {"family": "x"}
    (message,) = warnings_about(caplog, os.path.join(ckpts, "3"))
    assert "\n" not in message and "step 2" in message
    assert tree_listing(ckpts) == before  # a teacher's folder may be shared: untouched


def test_reading_a_model_ignores_a_damaged_iterator_state(ckpts):
    garbage_iterator_state(ckpts)  # the weights of step 3 are fine
    variables, _ = checkpoint.load_model_variables(ckpts)
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.full((8,), 3.0))


@pytest.mark.parametrize(
    "damage", [truncate_array_file, empty_step_folder], ids=lambda f: f.__name__
)
def test_a_named_damaged_step_is_an_error_not_a_fallback(ckpts, damage):
    damage(ckpts)
    folder = os.path.join(ckpts, "3")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_model_variables(folder)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {folder} cannot be restored: ") and "\n" not in msg
    assert os.path.isdir(folder)


def test_a_named_unfinished_save_is_refused(ckpts):
    name = half_written_tmp_dir(ckpts)
    with pytest.raises(checkpoint.CheckpointError, match="not a finished step folder"):
        checkpoint.load_model_variables(os.path.join(ckpts, name))


def test_reading_a_model_with_every_step_damaged_names_the_folder(ckpts):
    for step in STEPS:
        os.remove(os.path.join(ckpts, str(step), "state", "_METADATA"))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_model_variables(os.path.dirname(ckpts))
    lines = str(e.value).splitlines()
    assert lines[0] == f"no checkpoint in {ckpts} can be restored:"
    assert len(lines) == 1 + len(STEPS) and all("_METADATA" in ln for ln in lines[1:])


# ---------------------------------------------------------------- scripts/export_student.py


def export(workdir, out, *extra):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "export_student.py")]
        + [f"--workdir={workdir}", "--format=orbax", f"--out={out}", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_export_script_reports_a_damaged_workdir_in_one_line(ckpts, tmp_path):
    workdir = os.path.dirname(ckpts)
    for step in STEPS:
        truncate_array_file_at(ckpts, step)
    proc = export(workdir, tmp_path / "student")
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert ckpts in errors[0] and all(os.path.join(ckpts, str(s)) in errors[0] for s in STEPS)
    assert not os.path.exists(tmp_path / "student")
    # a named damaged step is refused by name, never swapped for another
    proc = export(workdir, tmp_path / "student", "--step=2")
    assert proc.returncode == 1
    (error,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert f"checkpoint {os.path.join(ckpts, '2')} cannot be restored" in error


def test_export_script_skips_a_damaged_latest_step_with_a_warning(ckpts, tmp_path):
    truncate_array_file(ckpts)
    proc = export(os.path.dirname(ckpts), tmp_path / "student")
    assert proc.returncode == 0, proc.stderr
    assert os.path.join(ckpts, "3") in proc.stderr and "reading step 2" in proc.stderr
    variables, _ = checkpoint.load_model_variables(str(tmp_path / "student"))
    np.testing.assert_array_equal(
        variables["params"]["conv"]["kernel"],
        make_state(2)["params"]["student"]["conv"]["kernel"],
    )


# ---------------------------------------------------------------- weight files (.pth, .safetensors)


def tiny_expected():
    """A model with one conv and one BN: mmdetection keys backbone.conv1.weight, backbone.bn1.*."""
    return {
        "params": {
            "backbone": {
                "conv1": {"kernel": np.zeros((3, 3, 3, 8), np.float32)},
                "bn1": {"scale": np.zeros((8,), np.float32), "bias": np.zeros((8,), np.float32)},
            }
        },
        "batch_stats": {
            "backbone": {
                "bn1": {"mean": np.zeros((8,), np.float32), "var": np.zeros((8,), np.float32)}
            }
        },
    }


def tiny_state_dict():
    rng = np.random.default_rng(0)
    return {
        "backbone.conv1.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "backbone.bn1.weight": rng.normal(size=(8,)).astype(np.float32),
        "backbone.bn1.bias": rng.normal(size=(8,)).astype(np.float32),
        "backbone.bn1.running_mean": rng.normal(size=(8,)).astype(np.float32),
        "backbone.bn1.running_var": rng.uniform(1, 2, size=(8,)).astype(np.float32),
        # torch's BN counter is int64 in every mmdetection checkpoint: a buffer, not a weight
        "backbone.bn1.num_batches_tracked": np.array(1000, np.int64),
    }


def write_weights(path, state_dict):
    """`state_dict` (numpy or torch tensors) as a .pth in mmdetection's layout or .safetensors."""
    torch = pytest.importorskip("torch")
    tensors = {
        k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
        for k, v in state_dict.items()
    }
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"meta": {"CLASSES": ["a"]}, "state_dict": tensors}, str(path))
    return str(path)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_integer_weights_are_refused_by_name(tmp_path, ext):
    from jdistill.convert import mmdet

    sd = tiny_state_dict()
    sd["backbone.conv1.weight"] = np.arange(8 * 27, dtype=np.int32).reshape(8, 3, 3, 3)
    sd["backbone.bn1.running_var"] = np.ones((8,), np.int64)
    path = write_weights(tmp_path / f"w{ext}", sd)
    with pytest.raises(mmdet.ConversionError) as e:
        mmdet.load_variables(path, tiny_expected(), family="retinanet", what=path)
    msg = str(e.value)
    assert path in msg
    assert "not floating point: backbone.conv1.weight: checkpoint int32 vs model float32" in msg
    assert "not floating point: backbone.bn1.running_var: checkpoint int64 vs model float32" in msg
    assert "num_batches_tracked" not in msg  # the int64 buffer is legitimate


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_int64_buffers_and_half_precision_weights_load(tmp_path, ext):
    torch = pytest.importorskip("torch")
    from jdistill.convert import mmdet

    sd = tiny_state_dict()
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    tensors["backbone.conv1.weight"] = tensors["backbone.conv1.weight"].to(torch.bfloat16)
    tensors["backbone.bn1.bias"] = tensors["backbone.bn1.bias"].to(torch.float16)
    path = write_weights(tmp_path / f"w{ext}", tensors)
    variables, _ = mmdet.load_variables(path, tiny_expected(), family="retinanet")
    kernel = variables["params"]["backbone"]["conv1"]["kernel"]
    assert kernel.dtype == np.float32
    want = tensors["backbone.conv1.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(kernel, want)  # bfloat16 -> float32 is exact
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["bn1"]["bias"], sd["backbone.bn1.bias"].astype(np.float16)
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["bn1"]["var"], sd["backbone.bn1.running_var"]
    )


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_an_empty_weight_file_is_named(tmp_path, ext):
    from jdistill.convert import mmdet

    path = str(tmp_path / f"empty{ext}")
    open(path, "wb").close()
    with pytest.raises(mmdet.ConversionError, match="empty file") as e:
        mmdet.read_checkpoint(path)
    assert path in str(e.value)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_a_truncated_weight_file_is_named(tmp_path, ext):
    from jdistill.convert import mmdet

    path = write_weights(tmp_path / f"w{ext}", tiny_state_dict())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)
    with pytest.raises(mmdet.ConversionError, match="damaged or truncated") as e:
        mmdet.read_checkpoint(path)
    assert str(e.value).startswith(f"cannot read {path}: ") and "\n" not in str(e.value)


def test_a_garbage_safetensors_file_is_named(tmp_path):
    from jdistill.convert import mmdet

    path = str(tmp_path / "garbage.safetensors")
    with open(path, "wb") as f:
        f.write(b"this is not a safetensors file" * 10)
    with pytest.raises(mmdet.ConversionError, match="not a valid .safetensors file") as e:
        mmdet.read_checkpoint(path)
    assert path in str(e.value)
