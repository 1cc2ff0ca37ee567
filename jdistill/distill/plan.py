"""A config's distillation, resolved: which distillers run, with which settings, and what they
need from the two detectors. The trainer drives every method through this and names none.

`config.distill.losses` is a dict of blocks `<key>: {fn: <registered name>, weight: w, ...}`;
each block overlays its distiller's `defaults`. The loss of block `key` enters the total as
`weight * warm-up * decay * loss` and is logged as `distill/<key>`.
"""

import dataclasses

import jax
import ml_collections
from absl import logging

from jdistill import config_lib
from jdistill.distill import api, registry
from jdistill.models import resnet


@dataclasses.dataclass(frozen=True)
class Term:
    """One configured distillation loss: its config key, distiller and resolved settings."""

    key: str
    distiller: api.Distiller
    cfg: ml_collections.ConfigDict


def terms(config):
    """The configured `Term`s in config order ([] without `distill.losses`).

    Raises KeyError for an unregistered `fn`.
    """
    distill = config.get("distill")
    if not distill or not distill.get("losses"):
        return []
    out = []
    for key, block in distill.losses.items():
        out.append(Term(key, registry.get(block.fn), registry.resolve(block)))
    return out


def problems(terms_, spec):
    """Why a student/teacher pair cannot run these terms: a list of one-line messages ([] when
    it can), from each distiller's declared needs and its own `check`."""
    errors = []
    s, t = spec.student, spec.teacher
    readers = {}  # view -> (its first reader's key, that reader's count_padding)
    for term in terms_:
        d, where = term.distiller, f"distill.losses.{term.key} ({term.cfg.fn})"
        if d.same_family and s.family != t.family:
            errors.append(
                f"{where} needs a teacher of the student's family ({s.family!r}, the teacher is "
                f"{t.family!r}): {d.same_family}"
            )
            continue
        have_s = set(s.provides) | set(s.loss_taps)
        for group in d.student_taps:
            if group not in have_s:
                errors.append(
                    f"{where} reads the student's {group!r} taps, which a {s.family} student does "
                    f"not provide (it has {sorted(have_s)})"
                )
        for group in d.teacher_taps:
            if group not in t.provides:
                errors.append(
                    f"{where} reads the teacher's {group!r} taps, which a {t.family} teacher does "
                    f"not provide (it has {sorted(t.provides)})"
                )
        padding = bool(term.cfg.get("count_padding", False))
        for view in d.views:
            if view not in t.views:
                errors.append(f"{where} needs the view {view!r}, which a {t.family} teacher lacks")
            first, first_padding = readers.setdefault(view, (term.key, padding))
            if padding != first_padding:
                errors.append(
                    f"{where}: count_padding differs from distill.losses.{first}'s, and both read "
                    f"the view {view!r}, which is computed once for all its readers"
                )
        if not api.paired_levels(spec):
            errors.append(f"{where}: the student's and the teacher's levels share no stride")
        if d.check is not None:
            msg = d.check(term.cfg, spec)
            if msg:
                errors.append(f"{where}: {msg}")
    return errors


def views(terms_):
    """{view name: count_padding} of the teacher-on-student views the terms read, in first-use
    order. A view is computed once for all its readers, with their `count_padding` setting
    (`problems` refuses readers that disagree)."""
    out = {}
    for term in terms_:
        for view in term.distiller.views:
            out.setdefault(view, bool(term.cfg.get("count_padding", False)))
    return out


def init_params(rng, terms_, spec):
    """{key: params} of the terms whose distiller has trainable parameters for this pair; each
    distiller with an `init` draws its own key, split off `rng` in config order."""
    params = {}
    for term in terms_:
        if term.distiller.init is not None:
            rng, key = jax.random.split(rng)
            value = term.distiller.init(key, cfg=term.cfg, spec=spec)
            if value is not None:  # None: nothing to train for this pair (e.g. equal widths)
                params[term.key] = value
    return params


def add_losses(total, terms_, student_taps, teacher_taps, batch, params, spec, factor, scales=None):
    """Adds every term's weighted loss to `total`, term by term in config order.

    Args:
      total: the detection loss, a scalar.
      terms_: from `terms`.
      student_taps, teacher_taps: the detectors' taps (the teacher's with its views).
      batch: the device batch, plus `rng`, the step's key for stochastic methods.
      params: {key: params} from `init_params`.
      spec: the `api.Pair`.
      factor: the warm-up times decay scalar.
      scales: optional {key: scalar} extra factors (`balance.py`'s auto-balance).
    Returns:
      (total plus the weighted terms, {'distill/<key>': weighted, 'distill/<key>/<metric>': ..}).
    """
    metrics = {}
    for term in terms_:
        value, extra = term.distiller.loss(
            student_taps, teacher_taps, batch, params.get(term.key), cfg=term.cfg, spec=spec
        )
        contrib = factor * term.cfg.weight * value
        if scales is not None:
            contrib = contrib * scales[term.key]
        metrics[f"distill/{term.key}"] = contrib
        metrics.update({f"distill/{term.key}/{k}": v for k, v in extra.items()})
        total = total + contrib
    return total, metrics


def check(config):
    """Refuses a config whose distillation cannot run, from the config alone, before the data or
    a detector exists (`config_lib.ConfigError`, one line): an unregistered or mistyped loss
    block, no teacher, normalisation groups that do not divide the batch, `init_from_teacher`
    across shapes, no teacher weights. What the built pair cannot do is `check_pair`'s.
    """
    teacher = config.get("teacher")
    try:
        terms_ = terms(config)
    except KeyError as e:
        raise config_lib.ConfigError(e.args[0]) from e
    except TypeError as e:  # a block value of another type than the distiller's default
        raise config_lib.ConfigError(f"config.distill.losses: {e}") from e
    if not terms_:
        return
    if not teacher:
        raise config_lib.ConfigError("config.distill has losses but config.teacher is not set")
    errors = []
    # Distillers normalise per group of images of the global batch (the originals' GPUs).
    groups = [(f"distill.losses.{t.key}.group_size", t.cfg.get("group_size", 0)) for t in terms_]
    groups.append(("teacher.model.loss_group_size", teacher.model.get("loss_group_size", 0)))
    for key, g in groups:
        if g and g < config.batch_size and config.batch_size % g:
            errors.append(f"config.{key}={g} does not divide batch_size {config.batch_size}")
    if config.distill.get("init_from_teacher", False):
        errors += _init_from_teacher_problems(config.model, teacher.model)
    if errors:
        raise config_lib.ConfigError("; ".join(errors))
    if not teacher.get("init"):
        if not config.runlocal:
            raise config_lib.ConfigError(
                "config.teacher.init is empty: a distillation run needs a trained teacher "
                "(an orbax checkpoint or a run's workdir); only :runlocal allows a random one"
            )
        logging.warning(
            "teacher.init is empty: using a RANDOMLY INITIALISED teacher (runlocal only)"
        )


def check_pair(terms_, spec):
    """Refuses a built student/teacher pair (`spec`, an `api.Pair`) that these terms cannot
    run, naming every reason (`config_lib.ConfigError`, one line; `problems` lists them)."""
    errors = problems(terms_, spec)
    if errors:
        raise config_lib.ConfigError("; ".join(errors))


def _init_from_teacher_problems(s, t):
    """Why the student's neck and heads (model block `s`) cannot start from the teacher's
    (`t`): a list of one-line messages."""
    errors = []
    for what in ("family", "neck_channels", "stacked_convs"):
        if s.get(what) != t.get(what):
            errors.append(
                f"distill.init_from_teacher copies the teacher's neck and heads, but the "
                f"student's model.{what} {s.get(what)!r} differs from the teacher's {t.get(what)!r}"
            )
    s_channels = resnet.out_channels(s.get("depth", 50), s.get("width", 1.0))
    t_channels = resnet.out_channels(t.get("depth", 50), t.get("width", 1.0))
    if s_channels != t_channels:
        errors.append(
            "distill.init_from_teacher copies the teacher's neck, whose lateral convs take the "
            f"backbone's channels: the student's backbone (depth {s.get('depth')}, width "
            f"{s.get('width')}) gives {list(s_channels)}, the teacher's (depth {t.get('depth')}, "
            f"width {t.get('width')}) {list(t_channels)}"
        )
    return errors
