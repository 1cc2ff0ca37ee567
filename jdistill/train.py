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
import numpy as np
from absl import logging

from jdistill import (
    checkpoint,
    config_lib,
    experiment,
    logs,
    metrics_writer,
    multihost,
    parallel,
    paths,
    stopping,
)
from jdistill.data import datasets, pipeline
from jdistill.distill import balance, plan
from jdistill.evaluate import distill_maps
from jdistill.evaluate.runner import close_iterator as _close_iterator
from jdistill.evaluate.runner import evaluate, make_predict

# A config value or flag the run cannot use (config_lib.py); the message names key and value.
ConfigError = config_lib.ConfigError


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


def check_config(config):
    """Refuses inconsistent configs before the data or any model exists (`ConfigError`): what
    the config alone gets wrong (`config_lib.check`), then what its distillation terms do
    (`plan.check`). What the built student/teacher pair cannot do is refused where the
    detectors are built, once (`experiment.build_models`), before any weight loads."""
    config_lib.check(config)
    plan.check(config)


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
      Preempted: SIGTERM or SIGINT arrived in training; a checkpoint of the step then
        finishing was saved and the run can be continued.
      stopping.Stopped: SIGTERM or SIGINT arrived in any other phase; the run stopped at once,
        saying what was kept (a BaseException, as KeyboardInterrupt).
    """
    with stopping.SIGNALS.installed():
        return _run(config, workdir, stop_at_step, stopping.SIGNALS)


def _run(config, workdir, stop_at_step, signals):
    check_config(config)
    config_lib.check_paths(config)  # init / teacher.init name something, before the data
    config_lib.check_workdir(workdir)
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
        data = datasets.open(config)
    train_split, eval_split, sampler = data.train, data.eval, data.sampler

    # ------------------------------------------------------------------ models, state, step
    mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    latest = mgr.latest_step()
    with signals.phase("building the models", as_it_was):
        exp = experiment.setup(
            config,
            mesh,
            num_classes=data.num_classes,
            canvas=tuple(config.data.canvases[0]),
            steps_per_epoch=sampler.steps_per_epoch,
            class_names=data.class_names,
            load_init=latest is None,
        )
    student, teacher, teacher_vars = exp.student, exp.teacher, exp.teacher_vars
    state, state_sharding, train_step = exp.state, exp.state_sharding, exp.train_step
    total_steps = exp.total_steps
    monitor = balance.Monitor(config, exp.terms)
    meta = {
        "class_names": list(data.class_names),
        "category_ids": list(data.category_ids),
        "model": config.model.to_dict(),
    }
    data_state = None
    if latest is not None:
        abstract = experiment.with_sharding(state, state_sharding)
        # The newest step that restores: damaged newer steps are set aside with a warning;
        # another model's checkpoints or no restorable step at all raise CheckpointError.
        with signals.phase("restoring the checkpoint", as_it_was):
            latest, state, data_state, _ = checkpoint.restore_newest(mgr, abstract)
        # Restored in the default layout; the step's own (`layouts.py`) before the first step,
        # so the first call does not hold the state twice.
        state = jax.device_put(state, exp.state_formats)
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
        # Pictures of what the terms weigh or mask, at each evaluation (distill_maps.py).
        maps_fn = None
        if distill_maps.drawn_terms(exp.terms) and config.get("num_vis_images", 4) > 0:
            maps_fn = jax.jit(distill_maps.make_maps_fn(config, exp))
            strides = dict(zip(student.spec.levels, student.spec.strides, strict=True))
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
                    data.category_ids,
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
                logs.hms(eta),
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
                data.category_ids,
            )
            writer.write(step, {f"eval/{k}": v for k, v in m.items()})
            if maps_fn is not None:
                distill_maps.write(
                    maps_fn,
                    _student_vars(state),
                    teacher_vars,
                    eval_split,
                    config,
                    mesh,
                    f"{workdir}/eval",
                    step,
                    strides,
                )
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
            except stopping.Stopped:
                if last_saved != done:
                    save(done)
                raise preempted(done) from None

        with signals.phase("training", "", deferred=True):
            for step in range(start, end):
                local = next(iterator)
                batch = datasets.device_batch(local, mesh)
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
