"""One experiment, built: the student and teacher detectors, their specs, the distillation
terms, the training state with its shardings, and the jitted step; beside it `make_predict`,
the predict function that evaluation and `jdistill.predict` jit.

`setup()` is the only place this sequence is written; `train.run`, `scripts/benchmark.py`,
`scripts/aot_compile.py` (with `abstract=True`: shapes only) and the multi-device test call
it. The teacher is read-only data: a separate variables pytree passed into the jitted step, run
outside `value_and_grad` under `stop_gradient`, never in the optimizer or a checkpoint. One
`jax.jit` over a `Mesh` shards the batch over `data`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from jdistill import checkpoint, layouts, optim, parallel
from jdistill.distill import api, balance, plan, registry
from jdistill.models import detector as detector_lib
from jdistill.models import layers, prefold

# ============================================================================ models


@dataclasses.dataclass(frozen=True)
class Models:
    """A config's detectors, built once: `teacher` and `spec` (an `api.Pair`) are None and
    `terms` is [] without distillation."""

    student: Any
    teacher: Any
    terms: list
    spec: api.Pair | None


def build_models(config, num_classes):
    """The student and, with distillation, the teacher for `num_classes` foreground classes.

    Raises `config_lib.ConfigError` (one line, every reason) when the distillation terms cannot
    read this pair (`plan.check_pair`): before any weight is loaded or anything compiled.
    """
    student = detector_lib.build(config.model, num_classes)
    terms = plan.terms(config)
    if not terms:
        return Models(student, None, [], None)
    teacher = detector_lib.build(config.teacher.model, num_classes)
    spec = api.Pair(student.spec, teacher.spec)
    plan.check_pair(terms, spec)
    return Models(student, teacher, terms, spec)


def model_inputs(detector, model_cfg, batch):
    """The network input for a detector: normalised canvas in its style and compute dtype."""
    return detector_lib.preprocess(
        batch["image"], batch["img_shape"], model_cfg.style, jnp.dtype(model_cfg.dtype)
    )


def init_variables(detector, canvas, seed):
    """Random {'params', 'batch_stats'} for a detector at a canvas (numpy-free, on device)."""
    dummy = jnp.zeros((1, *canvas, 3), jnp.float32)
    return jax.jit(detector.module.init)(jax.random.PRNGKey(seed), dummy)


def make_predict(detector, model_cfg):
    """The jittable predict(variables, batch) -> fixed-size detections in original-image pixels.

    Beside the train step, since both run the network on `model_inputs` of a pipeline batch.
    Returns the detector's dict (boxes [B, D, 4], scores [B, D], labels [B, D], valid [B, D])
    plus the batch's image_id [B] and image_valid [B].
    """

    def predict(variables, batch):
        outputs, _ = detector.module.apply(variables, model_inputs(detector, model_cfg, batch))
        dets = detector.predict(outputs, batch, variables=variables)
        dets["image_id"] = batch["image_id"]
        dets["image_valid"] = batch["image_valid"]
        return dets

    return predict


# ============================================================================ teacher


def load_teacher(config, detector, class_names, canvas):
    """Teacher variables from `teacher.init`, checked strictly; random only under runlocal.

    `teacher.init` is a jdistill orbax checkpoint (a run's workdir, its checkpoints/ or one
    step) or an mmdetection `.pth` / `.safetensors`, converted on load. `class_names`: the
    data set's, compared with those the checkpoint records (None: not compared).
    """
    expected = abstract_variables(detector, canvas)
    path = config.teacher.get("init")
    if not path:
        return init_variables(detector, canvas, config.seed + 1)
    merged, trained_on = load_variables(
        path, expected, config.teacher.model, config.teacher.get("init_skip", ()), "teacher"
    )
    if trained_on and class_names is not None and tuple(trained_on) != tuple(class_names):
        raise ValueError(
            f"teacher {path} was trained on classes {list(trained_on)} but the data set has "
            f"{list(class_names)}; refusing to distil from a mismatched teacher"
        )
    logging.info("teacher loaded from %s", path)
    return jax.tree_util.tree_map(jnp.asarray, merged)


def load_variables(path, expected, model_cfg, skip, what):
    """{'params', 'batch_stats'} for a model from `path`, strictly.

    `path` is a jdistill orbax checkpoint (a run's workdir, its checkpoints/ or one step) or an
    mmdetection `.pth` / `.safetensors` (a whole detector, or an ImageNet backbone), converted
    on load. Returns (variables, the class names the checkpoint was trained on, or None).
    """
    if path.endswith((".pth", ".safetensors")):
        from jdistill.convert import mmdet  # noqa: PLC0415 (needs the [convert] extra)

        return mmdet.load_variables(
            path,
            expected,
            family=model_cfg.family,
            skip=tuple(skip),
            what=what,
            backbone_ok=what != "teacher",
        )
    loaded, meta = checkpoint.load_model_variables(path)
    merged = checkpoint.check_and_merge(loaded, expected, skip=tuple(skip), what=f"{what} {path}")
    return merged, (meta or {}).get("class_names")


# ============================================================================ state


def init_state(config, student, terms, spec, canvas, tx_builder, load_init=True, teacher_vars=None):
    """The training state: step, params {student, adapters}, batch_stats, opt_state, bad_step,
    and `balance` under `distill.auto_balance` (`distill/balance.py`).

    `params['adapters']` holds the distillers' own trainable parameters by config key
    (adapters, generation blocks; `plan.init_params`). With `load_init`, the student starts
    from `config.init` (when set) and then, with `distill.init_from_teacher`, takes every
    non-backbone weight from `teacher_vars`; a resumed run passes False, since its checkpoint
    replaces these values anyway.
    """
    variables = init_variables(student, canvas, config.seed)
    distill_params = plan.init_params(jax.random.PRNGKey(config.seed + 2), terms, spec)
    params = {"student": variables["params"], "adapters": distill_params}
    path = config.get("init") if load_init else None
    if path:
        expected = {"params": params["student"], "batch_stats": variables["batch_stats"]}
        merged, _ = load_variables(
            path, expected, config.model, config.get("init_skip", ()), "student init"
        )
        params["student"] = merged["params"]
        variables = {"batch_stats": merged["batch_stats"]}
        logging.info("student initialised from %s", path)
    if load_init and terms and config.distill.get("init_from_teacher", False):
        params["student"], stats = inherit_from_teacher(
            params["student"], variables["batch_stats"], teacher_vars
        )
        variables = {"batch_stats": stats}
    tx = tx_builder(params)
    state = {
        "step": jnp.int32(0),
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(params),
        "bad_step": jnp.int32(-1),
    }
    if terms and config.distill.get("auto_balance", False):
        state["balance"] = balance.init_state(terms)
    return state, tx


def inherit_from_teacher(params, batch_stats, teacher_vars):
    """The student's variables with every non-backbone subtree (neck, heads) taken from the
    teacher, as some methods publish their students' start (`distill.init_from_teacher`).

    Raises ValueError naming the first parameter whose shape differs (the two necks and heads
    must have the same widths).
    """

    def take(mine, theirs, what):
        out = dict(mine)
        for name, sub in mine.items():
            if name == "backbone":
                continue
            if name not in theirs:
                raise ValueError(f"init_from_teacher: the teacher has no {what} {name!r}")
            a = jax.tree_util.tree_structure(sub)
            b = jax.tree_util.tree_structure(theirs[name])
            shapes_a = [x.shape for x in jax.tree_util.tree_leaves(sub)]
            shapes_b = [x.shape for x in jax.tree_util.tree_leaves(theirs[name])]
            if a != b or shapes_a != shapes_b:
                raise ValueError(
                    f"init_from_teacher: the student's {what} {name!r} differs from the "
                    "teacher's in structure or shape (widths must match)"
                )
            # Copies: the state is donated to the step, and must not donate the teacher's buffers.
            out[name] = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), theirs[name])
        return out

    return (
        take(params, teacher_vars["params"], "parameters"),
        take(batch_stats, teacher_vars.get("batch_stats", {}), "batch statistics"),
    )


# ============================================================================ step


# Folded into the step's key for the distillers' randomness (random masks), apart from the
# samplers' stream.
DISTILL_STREAM = 0x6B64


def make_train_step(config, student, teacher, terms, tx, schedule, total_steps=0):
    """The jittable step(state, teacher_vars, batch) -> (state, metrics).

    Any teacher-on-student views the terms need are computed by the teacher's detector inside
    the loss (they depend on the student's outputs, e.g. its sampled regions); each view stops
    the gradients it must (`Detector.view`), since some differentiate the student through the
    frozen teacher's layers.
    """
    warmup = config.distill.warmup_steps if terms else 0
    decay = config.distill.get("decay", "none") if terms else "none"
    views = plan.views(terms)
    auto_balance = bool(terms) and config.distill.get("auto_balance", False)
    balance_start, balance_steps = balance.window(config) if terms else (0, 0)
    balance_target = config.distill.get("balance_target", balance.DEFAULT_TARGET) if terms else 1
    spec = api.Pair(student.spec, teacher.spec) if teacher is not None else None
    base_key = jax.random.PRNGKey(config.seed + 3)

    def step_fn(state, teacher_vars, batch):
        step = state["step"]
        x_s = model_inputs(student, config.model, batch)
        t_taps = t_outputs = None
        if teacher is not None:
            x_t = model_inputs(teacher, config.teacher.model, batch)
            t_outputs, t_taps = jax.lax.stop_gradient(teacher.module.apply(teacher_vars, x_t))
        key = jax.random.fold_in(base_key, step)  # the samplers' randomness, by step

        def loss_fn(params):
            variables = {"params": params["student"], "batch_stats": state["batch_stats"]}
            if config.model.norm_eval:
                (outputs, taps), new_stats = student.module.apply(variables, x_s), None
            else:
                (outputs, taps), upd = student.module.apply(
                    variables, x_s, train=True, mutable=["batch_stats"]
                )
                new_stats = upd["batch_stats"]
            taps = dict(taps)
            total, det = student.loss(outputs, batch, variables=variables, rng=key, taps=taps)
            metrics = {f"student/{k}": v for k, v in det.items()}
            if terms:
                teacher_view = dict(t_taps)
                for name, count_padding in views.items():
                    # Not stopped here: a view stops what it must itself; some carry the
                    # student's gradient through the teacher's layers.
                    teacher_view.update(
                        teacher.view(
                            name, teacher_vars, t_outputs, t_taps, taps, count_padding=count_padding
                        )
                    )
                factor = registry.warmup_factor(step, warmup) * registry.decay_factor(
                    step, total_steps, decay
                )
                d_batch = {**batch, "rng": jax.random.fold_in(key, DISTILL_STREAM)}
                metrics["student/loss"] = total
                scales = state["balance"]["scale"] if auto_balance else None
                total, d_metrics = plan.add_losses(
                    total,
                    terms,
                    taps,
                    teacher_view,
                    d_batch,
                    params["adapters"],
                    spec,
                    factor,
                    scales,
                )
                metrics.update(d_metrics)
            metrics["loss"] = total
            return total, (metrics, new_stats)

        (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        if new_stats is None:
            new_stats = state["batch_stats"]
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite step leaves params and optimizer untouched and is reported by the host at
        # its next log or checkpoint, so no per-step device->host sync is needed.
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old
        )
        new_state = {
            "step": step + 1,
            "params": keep(params, state["params"]),
            "batch_stats": keep(new_stats, state["batch_stats"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            # The first non-finite update, counted from 1 as the log counts (-1: none yet).
            "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, step + 1, state["bad_step"]),
        }
        if auto_balance:
            contribs = {t.key: metrics[f"distill/{t.key}"] for t in terms}
            updated = balance.update(
                state["balance"],
                step,
                contribs,
                metrics["student/loss"],
                start=balance_start,
                steps=balance_steps,
                target=balance_target,
            )
            new_state["balance"] = keep(updated, state["balance"])
            metrics.update({f"distill/{k}/scale": v for k, v in updated["scale"].items()})
        metrics["grad_norm"] = gnorm
        metrics["lr"] = schedule(step)
        return new_state, metrics

    return step_fn


# ============================================================================ setup


@dataclasses.dataclass
class Experiment:
    """What `setup` built. `teacher`, `teacher_vars` and `spec` are None without distillation;
    `state` is on the mesh with `state_sharding`, its kernels laid out as `state_formats` says
    (`layouts.formats`); `train_step(state, teacher_vars, batch)` is jitted over the mesh,
    donating the state."""

    student: Any
    teacher: Any
    spec: api.Pair | None
    terms: list
    teacher_vars: Any
    state: dict
    state_sharding: Any
    state_formats: Any
    tx: optax.GradientTransformation
    schedule: Callable
    total_steps: int
    train_step: Callable


def setup(
    config,
    mesh,
    *,
    num_classes,
    canvas,
    steps_per_epoch,
    class_names=None,
    load_init=True,
    abstract=False,
):
    """Builds the experiment of `config` on `mesh`.

    Args:
      config: a run config (`configs/`).
      mesh: the device mesh (`parallel.make_mesh`, or compile-only devices).
      num_classes: foreground classes of the data set.
      canvas: (H, W) of the first training canvas, to initialise at.
      steps_per_epoch: of the training sampler, for the schedule.
      class_names: the data set's, checked against a teacher checkpoint's (None: unchecked).
      load_init: start the student from `config.init`; a resumed run passes False.
      abstract: nothing is allocated or loaded: `state` and `teacher_vars` are
        `jax.ShapeDtypeStruct`s with their shardings (`jax.eval_shape`), for compiling the step
        ahead of time (`scripts/aot_compile.py`) on devices this process may not have.
    Returns:
      an `Experiment`.
    Raises:
      config_lib.ConfigError: the distillation terms cannot read this student/teacher pair.
    """
    schedule, total_steps = optim.lr_schedule(config.optimizer, config.schedule, steps_per_epoch)
    models = build_models(config, num_classes)
    student, teacher, terms, spec = models.student, models.teacher, models.terms, models.spec
    replicated = parallel.replicated(mesh)
    teacher_vars = None
    if terms and abstract:
        teacher_vars = with_sharding(abstract_variables(teacher, canvas), lambda _: replicated)
    elif terms:
        teacher_vars = load_teacher(config, teacher, class_names, canvas)
        teacher_vars = jax.device_put(teacher_vars, replicated)
    tx_builder = lambda params: optim.make_optimizer(  # noqa: E731
        config.optimizer, config.model, params, schedule
    )
    if abstract:
        built = {}

        def state_only(t_vars):
            state, built["tx"] = init_state(
                config, student, terms, spec, canvas, tx_builder, False, t_vars
            )
            return state

        state = jax.eval_shape(state_only, teacher_vars)
        tx = built["tx"]
    else:
        state, tx = init_state(
            config, student, terms, spec, canvas, tx_builder, load_init, teacher_vars
        )
    state_sharding = parallel.param_shardings(state, mesh, config.param_sharding)
    # The conv kernels and their momentum lie output-channel major on a GPU (layouts.py).
    state_formats = layouts.formats(state, state_sharding, mesh)
    if abstract:
        state = with_sharding(state, state_formats)
    else:
        state = jax.device_put(state, state_formats)
    # The student inherits from the teacher's variables as loaded (init_state); the step reads
    # them prefolded.
    teacher_specs = replicated
    if terms:
        teacher, teacher_vars, teacher_specs = place_teacher(
            config.teacher.model, teacher, teacher_vars, mesh, abstract=abstract
        )
    train_step = jax.jit(
        make_train_step(config, student, teacher, terms, tx, schedule, total_steps),
        in_shardings=(state_formats, teacher_specs, parallel.batch_sharding(mesh)),
        out_shardings=(state_formats, replicated),
        donate_argnums=(0,),
    )
    return Experiment(
        student,
        teacher,
        spec,
        terms,
        teacher_vars,
        state,
        state_sharding,
        state_formats,
        tx,
        schedule,
        total_steps,
        train_step,
    )


def place_teacher(model_cfg, teacher, variables, mesh, *, abstract=False):
    """The teacher as every program reads it: with `fold_bn`, its BatchNorms folded into its
    convs once and its kernels in the compute dtype (`models/prefold.py`); replicated over the
    mesh with its kernels in the step's layout (`layouts.py`).

    Args:
      model_cfg: the teacher's `model` block.
      teacher: its detector.
      variables: its {'params', 'batch_stats'} as loaded, replicated on the mesh (with
        `abstract`, ShapeDtypeStructs).
      mesh: the mesh.
      abstract: shapes only (`setup(abstract=True)`).
    Returns:
      (the detector that reads the result, the variables, their jit argument specs).
    """
    fold = None
    if model_cfg.fold_bn:
        dtype = layers.compute_dtype(model_cfg.dtype)
        fold = lambda v: prefold.variables(v, dtype)  # noqa: E731
        teacher = prefold.detector(teacher)
    shapes = jax.eval_shape(fold, variables) if fold else variables
    replicated = parallel.replicated(mesh)
    specs = layouts.formats(shapes, jax.tree_util.tree_map(lambda _: replicated, shapes), mesh)
    if abstract:
        return teacher, with_sharding(shapes, specs), specs
    if fold is None:  # placed as they are (no copy where the layout is already theirs)
        return teacher, jax.device_put(variables, specs), specs
    return teacher, jax.jit(fold, out_shardings=specs)(variables), specs


def abstract_variables(detector, canvas):
    """{'params', 'batch_stats'} of a detector as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(
        detector.module.init, jax.random.PRNGKey(0), jnp.zeros((1, *canvas, 3), jnp.float32)
    )


def with_sharding(tree, shardings):
    """`tree`'s leaves as ShapeDtypeStructs carrying `shardings` (a matching pytree, or a
    function of the leaf)."""
    if callable(shardings):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings(x)), tree
        )
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
