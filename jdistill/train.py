"""The trainer: one readable function `run(config, workdir)`, in banner sections.

config checks / loop

The models, the distillation terms, the state and the jitted step come from
`experiment.setup`, evaluation from `evaluate/runner.py`; each canvas compiles once. No method
or detector family is named here: what a distiller needs is checked against what the detectors
provide (`distill/plan.py`).
"""

import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from jdistill import (
    checkpoint,
    experiment,
    metrics_writer,
    multihost,
    parallel,
    paths,
    stopping,
)
from jdistill.data import pipeline, sources
from jdistill.distill import api, balance, plan
from jdistill.evaluate import coco as coco_eval
from jdistill.evaluate.runner import close_iterator as _close_iterator
from jdistill.evaluate.runner import evaluate, make_predict, subset
from jdistill.models import detector as detector_lib
from jdistill.models import resnet


class ConfigError(ValueError):
    """A config value or flag the run cannot use; the message names the key and the value."""


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the message names the step (counted from 1, as
    the log counts), the loss terms there and the last checkpoint to restart from."""


# SIGTERM or SIGINT stopped the run (jdistill/stopping.py); `main` logs it and exits 0.
Preempted = stopping.Preempted


# A checkpoint is offered as the restart point after a non-finite loss only when the loss its
# parameters gave next was at most this many times the smallest loss the run logged before.
# Divergence is orders of magnitude (1e13 before inf), while the ordinary ups and downs of a
# detection loss - warm-up, a hard batch, an LR step - stay within 2-3x of the best so far;
# 10x leaves room for those without accepting parameters that have already blown up.
SANE_LOSS_FACTOR = 10.0


# ============================================================================ config checks


# Integer settings: (key, smallest allowed value, what a value means). Checked before anything
# is built, since a 0 interval compiles and trains a step before `step % 0` fails, and a 0 batch
# fails deep inside the mesh code.
_INTEGER_KEYS = (
    ("batch_size", 1, "images per step over all devices"),
    ("eval_batch_size", 1, "images per evaluation batch"),
    ("log_every", 1, "steps between log lines"),
    ("checkpoint_every", 1, "steps between checkpoints"),
    ("keep_checkpoints", 1, "checkpoints kept on disk"),
    ("eval_every", 0, "steps between evaluations; 0: at the end only"),
    ("eval_max_images", 0, "images evaluated; 0: the whole split"),
    ("num_vis_images", 0, "images drawn per evaluation"),
    ("seed", None, "the random seed"),
    ("schedule.epochs", 1, "epochs of training (milestones are in epochs)"),
    ("schedule.num_steps", None, "steps of training; 0 or less: `schedule.epochs` epochs"),
    ("schedule.warmup_steps", 0, "steps of LR warm-up"),
    ("data.max_boxes", 1, "ground-truth boxes kept per image"),
    ("data.num_workers", 0, "input threads; 0: read in the training thread"),
    ("data.prefetch", 0, "batches read ahead"),
    ("distill.balance_steps", 0, "steps after the warm-up over which the loss balance is measured"),
)


def _check_integers(config):
    for key, low, meaning in _INTEGER_KEYS:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            continue  # a config without the key: the code that reads it uses its default
        if isinstance(node, bool) or not isinstance(node, int):
            raise ConfigError(f"config.{key}={node!r}: must be an integer ({meaning})")
        if low is not None and node < low:
            need = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"config.{key}={node!r}: must be {need} ({meaning})")


def check_config(config):
    """Refuses inconsistent configs before anything is loaded or compiled (`ConfigError`)."""
    _check_integers(config)
    teacher = config.get("teacher")
    try:
        detector_lib.check_block(config.model, "model")
        if teacher:
            detector_lib.check_block(teacher.model, "teacher.model")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        terms = plan.terms(config)
    except KeyError as e:
        raise ConfigError(e.args[0]) from e
    except TypeError as e:  # a block value of another type than the distiller's default
        raise ConfigError(f"config.distill.losses: {e}") from e
    if terms:
        if not teacher:
            raise ConfigError("config.distill has losses but config.teacher is not set")
        # The specs do not depend on the class count: any count builds them.
        spec = api.Pair(
            detector_lib.build(config.model, 1).spec,
            detector_lib.build(teacher.model, 1).spec,
        )
        errors = plan.problems(terms, spec)
        # Distillers normalise per group of images of the global batch (the originals' GPUs).
        groups = [(f"distill.losses.{t.key}.group_size", t.cfg.get("group_size", 0)) for t in terms]
        groups.append(("teacher.model.loss_group_size", teacher.model.get("loss_group_size", 0)))
        for key, g in groups:
            if g and g < config.batch_size and config.batch_size % g:
                errors.append(f"config.{key}={g} does not divide batch_size {config.batch_size}")
        if config.distill.get("init_from_teacher", False):
            s, t = config.model, teacher.model
            for what in ("family", "neck_channels", "stacked_convs"):
                if s.get(what) != t.get(what):
                    errors.append(
                        f"distill.init_from_teacher copies the teacher's neck and heads, but "
                        f"the student's model.{what} {s.get(what)!r} differs from the teacher's "
                        f"{t.get(what)!r}"
                    )
            s_channels = resnet.out_channels(s.get("depth", 50), s.get("width", 1.0))
            t_channels = resnet.out_channels(t.get("depth", 50), t.get("width", 1.0))
            if s_channels != t_channels:
                errors.append(
                    "distill.init_from_teacher copies the teacher's neck, whose lateral convs "
                    "take the backbone's channels: the student's backbone (depth "
                    f"{s.get('depth')}, width {s.get('width')}) gives {list(s_channels)}, "
                    f"the teacher's (depth {t.get('depth')}, width {t.get('width')}) "
                    f"{list(t_channels)}"
                )
        if errors:
            raise ConfigError("; ".join(errors))
        if not teacher.get("init"):
            if config.runlocal:
                logging.warning(
                    "teacher.init is empty: using a RANDOMLY INITIALISED teacher (runlocal only)"
                )
            else:
                raise ConfigError(
                    "config.teacher.init is empty: a distillation run needs a trained teacher "
                    "(an orbax checkpoint or a run's workdir); only :runlocal allows a random one"
                )
    if config.batch_size % jax.device_count():
        raise ConfigError(
            f"batch_size {config.batch_size} does not split over {jax.device_count()} devices"
        )
    backend = config.get("eval_backend", "pycocotools")
    try:
        coco_eval.check_backend(backend)
    except ValueError as e:
        raise ConfigError(f"config.eval_backend={backend!r}: {e}") from e
    if config.eval_batch_size % jax.device_count():
        raise ConfigError(
            f"eval_batch_size {config.eval_batch_size} does not split over "
            f"{jax.device_count()} devices"
        )
    group = config.model.loss_group_size
    per_device = config.batch_size // jax.device_count()
    if group and per_device % group and group % per_device:
        raise ConfigError(
            f"model.loss_group_size {group} must divide or be a multiple of the per-device batch "
            f"{per_device}"
        )


def check_workdir(workdir):
    """Creates `workdir` if needed and proves it writable, before anything is loaded.

    A regular file there, or a directory this user cannot write, would otherwise surface as a
    FileExistsError or PermissionError from wherever the run first writes.
    """
    if not workdir:
        raise ConfigError("--workdir is empty: pass the directory the run writes to")
    where = paths.path(workdir)
    if where.exists() and not where.is_dir():
        raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
    probe = where / f".write_probe.{jax.process_index()}.{os.getpid()}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        # Permission bits alone do not say it (root, ACLs, read-only mounts): try a write.
        probe.write_text("jdistill")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot be written ({e.strerror or e})") from e


# ============================================================================ loop


def run(config, workdir, *, stop_at_step=None):
    """Trains (or resumes) `config` in `workdir`; returns the final eval metrics.

    Args:
      config: a locked ConfigDict from `configs/`.
      workdir: where config.json, metrics.jsonl, TensorBoard events, checkpoints/ and eval/ go.
      stop_at_step: stop after this many steps (checkpointing there) without finishing the
        schedule: for time-sliced jobs and for the resume test. The run can be continued.
    Returns:
      dict of final eval metrics ({} when stopped early).
    Raises:
      ConfigError: a bad config value or workdir, before anything is loaded.
      NonFiniteLossError: the loss or gradient became NaN/inf.
      Preempted: SIGTERM or SIGINT arrived (`stopping`): in training, after saving a checkpoint
        of the step then finishing; in any other phase at once, saying what was kept.
    """
    with stopping.SIGNALS.installed():
        return _run(config, workdir, stop_at_step, stopping.SIGNALS)


def _run(config, workdir, stop_at_step, signals):
    check_config(config)
    check_workdir(workdir)
    mesh = parallel.make_mesh()
    logging.info(
        "mesh: %d devices (%s), %d processes",
        mesh.size,
        jax.devices()[0].platform,
        jax.process_count(),
    )

    # ------------------------------------------------------------------ data
    # A stop before training leaves the workdir as it was (tfds keeps only finished data sets).
    as_it_was = "the workdir is as it was; re-run the same command to go on"
    with signals.phase("preparing the data", as_it_was):
        train_split = sources.load_split(config.data, config.data.train_split)
        eval_split = subset(
            sources.load_split(config.data, config.data.eval_split), config.eval_max_images
        )
    sampler = pipeline.TrainSampler(train_split, config.data, config.batch_size, config.seed)
    logging.info(
        "data: %d training images (%d steps/epoch of %d), %d eval images, %d classes",
        sampler.num_images,
        sampler.steps_per_epoch,
        config.batch_size,
        len(eval_split),
        len(train_split.class_names),
    )
    num_classes = len(train_split.class_names)
    canvas = tuple(config.data.canvases[0])

    # ------------------------------------------------------------------ models, state, step
    mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    latest = mgr.latest_step()
    with signals.phase("building the models", as_it_was):
        exp = experiment.setup(
            config,
            mesh,
            num_classes=num_classes,
            canvas=canvas,
            steps_per_epoch=sampler.steps_per_epoch,
            class_names=train_split.class_names,
            load_init=latest is None,
        )
    student, teacher, teacher_vars = exp.student, exp.teacher, exp.teacher_vars
    state, state_sharding, train_step = exp.state, exp.state_sharding, exp.train_step
    total_steps = exp.total_steps
    monitor = balance.Monitor(config, exp.terms)
    meta = {
        "class_names": list(train_split.class_names),
        "category_ids": list(train_split.category_ids),
        "model": config.model.to_dict(),
    }
    data_state = None
    if latest is not None:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding
        )
        # The newest step that restores: damaged newer steps are set aside with a warning;
        # another model's checkpoints or no restorable step at all raise CheckpointError.
        with signals.phase("restoring the checkpoint", as_it_was):
            latest, state, data_state, _ = checkpoint.restore_newest(mgr, abstract)
        data_state = checkpoint.data_state_of_process(
            data_state, jax.process_index(), jax.process_count(), mgr.directory
        )
        logging.info("Resuming from step %d (%s)", latest, mgr.directory)
    start = int(state["step"])
    # Written once the workdir is known to be this config's: a refused resume (another model's
    # checkpoints) keeps the config.json of the run that wrote them.
    if jax.process_index() == 0:
        paths.write_json(os.path.join(workdir, "config.json"), config.to_dict())

    # ------------------------------------------------------------------ step functions
    # Everything from here on starts threads (input readers, orbax, the event writer) or device
    # work that the `finally` below stops again, whether the run ends, fails or is preempted.
    writer = iterator = None
    finished = False
    try:
        predict_student = jax.jit(make_predict(student, config.model))
        writer = metrics_writer.MetricWriter(workdir)
        # A run killed after its last checkpoint logged steps this one trains again: drop them
        # (a fresh start drops everything, the teacher's step-0 evaluation included).
        kept = writer.rewind(start if start > 0 else -1)
        # (step, mean loss, mean grad norm) of every logged window, to judge checkpoints by.
        history = [
            (r["step"], float(r["loss"]), float(r.get("grad_norm", 0.0)))
            for r in kept
            if "loss" in r
        ]
        cat_ids = train_split.category_ids

        if teacher is not None and start == 0:
            with signals.phase(
                "evaluating the teacher",
                "no step was trained and no checkpoint written; re-run the same command to start",
            ):
                logging.info("evaluating the teacher (%d images)", len(eval_split))
                t_metrics = evaluate(
                    jax.jit(make_predict(teacher, config.teacher.model)),
                    teacher_vars,
                    eval_split,
                    config,
                    mesh,
                    workdir,
                    "teacher_",
                    0,
                    cat_ids,
                )
            writer.write(0, {f"teacher_eval/{k}": v for k, v in t_metrics.items()})

        # -------------------------------------------------------------- loop
        end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
        iterator = iter(
            pipeline.train_dataset(
                train_split, sampler, config.data, seed=config.seed, num_steps=total_steps
            )
        )
        if data_state is not None:
            iterator.set_state(data_state)
        pending = []  # (step, device metrics) not yet logged; steps count from 1
        t_last, step_last = time.time(), start
        last_saved = latest
        final = {}

        def check_finite():
            bad = int(state["bad_step"])
            if bad < 0:
                return
            rows = jax.device_get([m for _, m in pending])
            steps = [s for s, _ in pending]
            terms = {k: float(v) for k, v in rows[steps.index(bad)].items()} if bad in steps else {}
            # Checkpoints are judged by the losses up to the bad step (later steps skipped the
            # update) once every asynchronous save is on disk.
            losses = history + [
                (s, float(r["loss"]), float(r["grad_norm"]))
                for s, r in zip(steps, rows, strict=True)
                if s <= bad
            ]
            mgr.wait_until_finished()
            saved = sorted(mgr.all_steps())
            good = last_good_checkpoint(saved, losses)
            if good is None:
                where = (
                    "none (no checkpoint's parameters went on to give a finite loss within "
                    f"{SANE_LOSS_FACTOR:g}x the run's best)"
                )
            else:
                where = os.path.join(mgr.directory, str(good))
                later = [s for s in saved if s > good]
                if later:
                    where += (
                        f" (the later checkpoints {later} gave a non-finite loss or one over "
                        f"{SANE_LOSS_FACTOR:g}x the run's best; move them away to resume from it)"
                    )
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad}; loss terms there: {terms}; "
                f"last good checkpoint: {where}"
            )

        def log(done):
            nonlocal pending, t_last, step_last
            check_finite()
            rows = jax.device_get([m for _, m in pending])
            monitor.observe([s for s, _ in pending], rows)
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            now = time.time()
            rate = (done - step_last) / max(now - t_last, 1e-9)
            eta = (total_steps - done) / max(rate, 1e-9)
            writer.write(done, {**mean, "steps_per_sec": rate})
            history.append((done, mean["loss"], mean["grad_norm"]))
            logging.info(
                "step %d/%d loss %.4f (%s) | %.2f steps/s, %.1f img/s | ETA %s",
                done,
                total_steps,
                mean["loss"],
                " ".join(f"{k}={v:.4f}" for k, v in mean.items() if k not in ("loss", "lr")),
                rate,
                rate * config.batch_size,
                _hms(eta),
            )
            pending, t_last, step_last = [], now, done

        def evaluate_student(step):
            m = evaluate(
                predict_student,
                _student_vars(state),
                eval_split,
                config,
                mesh,
                workdir,
                "",
                step,
                cat_ids,
            )
            writer.write(step, {f"eval/{k}": v for k, v in m.items()})
            return m

        def save(done):
            nonlocal last_saved
            check_finite()
            if pending:  # steps since the last log line
                rows = jax.device_get([m for _, m in pending])
                window = (done, *(float(np.mean([r[k] for r in rows])) for k in LOSS_KEYS))
            else:
                window = history[-1] if history else None
            record = loss_record(window, history)
            # Every process's own iterator state, in process order (a collective at this step).
            data = checkpoint.data_states(multihost.allgather_json(iterator.get_state()))
            checkpoint.save(mgr, done, state, data, {**meta, "loss": record}, force=True)
            last_saved = done

        def preempted(step):
            # The checkpoint must really be on disk before the run reports it and exits 0.
            mgr.wait_until_finished()
            return stopping.saved_at(signals.signame, step, mgr.directory)

        def evaluate_between_steps(done):
            # One process stops an evaluation at once and saves the step it evaluated; several
            # finish it (its batches are collectives) and stop together at the next poll.
            single = jax.process_count() == 1
            try:
                with signals.phase(
                    f"evaluating step {done}", "", deferred=not single, watched=False
                ):
                    evaluate_student(done)
            except Preempted:
                if last_saved != done:
                    save(done)
                raise preempted(done) from None

        with signals.phase("training", "", deferred=True):
            for step in range(start, end):
                local = next(iterator)
                batch = parallel.global_batch({k: local[k] for k in experiment.DEVICE_KEYS}, mesh)
                state, metrics = train_step(state, teacher_vars, batch)
                done = step + 1
                pending.append((done, metrics))
                log_step = done % config.log_every == 0
                stop = signals.agreed(poll=log_step)
                if log_step or done == end or stop:
                    log(done)
                if done % config.checkpoint_every == 0 or done == end or stop:
                    save(done)
                if stop:
                    raise preempted(done)
                if config.eval_every and done % config.eval_every == 0 and done != total_steps:
                    evaluate_between_steps(done)
            stop = end == total_steps and signals.agreed(poll=True)
            if stop and last_saved is not None:
                raise preempted(last_saved)  # skip the final evaluation; a re-run does it

        if end == total_steps:
            if latest is not None and latest == total_steps:
                logging.info("already trained to step %d; evaluating the final checkpoint", latest)
            with signals.phase(
                "evaluating the trained model",
                f"training finished and its last checkpoint (step {total_steps}) is in "
                f"{mgr.directory}; re-run the same command to evaluate it",
            ):
                final = evaluate_student(total_steps)
        finished = True
    finally:
        # Stop every thread the run started, also when it fails: a process that exits with
        # work in flight can hang in interpreter teardown (see main.py). The in-flight async
        # save finishes first, so the last good checkpoint an error names really is on disk.
        errors = _release(state, iterator, mgr, writer)
        if errors and finished:
            raise errors[0]
    return final


# Loss terms of a logged window that judge a checkpoint (the step's metrics hold them all).
LOSS_KEYS = ("loss", "grad_norm")


def loss_record(window, history, factor=SANE_LOSS_FACTOR):
    """The `loss` entry of a checkpoint's meta: the training loss that led to it.

    Args:
      window: (last step, mean loss, mean grad norm) of the steps just before the checkpoint,
        or None when none ran in this process (and none were logged).
      history: the logged windows (step, loss, grad norm) of the run so far, in order.
    Returns:
      {"mean", "grad_norm": floats or None; "finite": both finite; "best": the smallest logged
      loss before; "sane": finite and mean <= factor x best}, plain JSON.
    """
    if window is None:
        return {"mean": None, "grad_norm": None, "finite": False, "best": None, "sane": False}
    step, loss, gnorm = window
    best = min((w[1] for w in history if w[0] < step and math.isfinite(w[1])), default=math.inf)
    finite = math.isfinite(loss) and math.isfinite(gnorm)
    return {
        "mean": loss if math.isfinite(loss) else None,
        "grad_norm": gnorm if math.isfinite(gnorm) else None,
        "finite": finite,
        "best": best if math.isfinite(best) else None,
        "sane": finite and loss <= factor * best,
    }


def last_good_checkpoint(steps, losses, factor=SANE_LOSS_FACTOR):
    """The newest checkpoint a run can go on from after a non-finite loss, or None.

    The checkpoint of step s holds the parameters after update s; the loss those parameters
    give first shows at step s + 1. So a checkpoint is judged by the first logged loss after
    it, not by the one recorded when it was saved: that one can look fine while the last
    update already blew the parameters up (the 1e13 a resume then fails on). It is good when
    that next loss and gradient norm are finite and the loss is at most `factor` times the
    smallest loss logged before it.

    Args:
      steps: the checkpoint steps on disk.
      losses: (step, mean loss, mean grad norm) of logged windows and single steps, keyed by
        their last step; the last one may be non-finite.
    """
    verdicts = []  # (step, whether its loss is finite and sane)
    best = math.inf
    for step, loss, gnorm in sorted(losses):
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        verdicts.append((step, finite and loss <= factor * best))
        if finite:
            best = min(best, loss)
    good = None
    for s in sorted(steps):
        after = next((ok for step, ok in verdicts if step > s), False)
        if after:
            good = s
    return good


def _release(state, iterator, mgr, writer):
    """Stops what `run` started; returns the errors doing so (each also logged).

    Waits for the device first: a step still running holds the batch's host buffers, and
    freeing them later from an XLA thread needs the Python lock, which interpreter teardown
    holds while it waits for those threads.
    """
    errors = []

    def wait_for_device():
        try:
            jax.block_until_ready(state)
        except Exception:  # noqa: BLE001 (a donated or failed state has nothing in flight)
            pass

    def close_checkpoints():
        try:
            mgr.wait_until_finished()
        finally:
            mgr.close()

    for what, fn in (
        ("device work", wait_for_device),
        ("input threads", lambda: _close_iterator(iterator)),
        ("checkpoint manager", close_checkpoints),
        ("metrics writer", lambda: writer is not None and writer.close()),
    ):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (every resource gets its chance to close)
            logging.error("closing the %s failed: %s", what, e)
            errors.append(e)
    return errors


def _student_vars(state):
    return {"params": state["params"]["student"], "batch_stats": state["batch_stats"]}


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
