"""Loss balance: the host report and warning, the device-side auto-balance, init_from_teacher."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdistill import config_lib, experiment
from jdistill.distill import balance, plan


def config(auto=False, steps=3, warmup=2, target=1.0):
    c = ml_collections.ConfigDict(
        dict(
            distill=config_lib.distill(
                dict(
                    big=dict(fn="frs_feat", weight=0.5, adapter="conv1x1"),
                    small=dict(fn="frs_cls", weight=2.0),
                ),
                warmup_steps=warmup,
            )
        )
    )
    c.distill.update(balance_steps=steps, auto_balance=auto, balance_target=target)
    return c


def test_auto_balance_rescales_once_at_the_end_of_the_window():
    terms = plan.terms(config())
    state = balance.init_state(terms)
    step_fn = jax.jit(
        lambda s, step, c, d: balance.update(s, step, c, d, start=2, steps=3, target=1.0)
    )
    # detection loss 2; 'big' runs at 20 (10x), 'small' at 1 (0.5x); before the window (steps
    # 0, 1) the ratios do not count, whatever they are.
    seen = []
    for step in range(7):
        big = 20.0 if step >= 2 else 1000.0
        contribs = {"big": jnp.float32(big) * state["scale"]["big"], "small": jnp.float32(1.0)}
        state = step_fn(state, jnp.int32(step), contribs, jnp.float32(2.0))
        seen.append({k: float(v) for k, v in state["scale"].items()})
    assert seen[3] == {"big": 1.0, "small": 1.0}  # unchanged inside the window
    assert seen[4] == pytest.approx({"big": 0.1, "small": 2.0})  # set at its last step (4)
    assert seen[6] == seen[4]  # and never again
    np.testing.assert_allclose(float(state["ratio_sum"]["big"]), 30.0)  # 3 steps x 10
    assert float(state["count"]) == 3.0


def test_auto_balance_caps_the_scale_of_a_vanishing_term():
    terms = plan.terms(config())
    state = balance.init_state(terms)
    for step in range(5):
        contribs = {"big": jnp.float32(1e-6), "small": jnp.float32(1.0)}
        state = balance.update(
            state, jnp.int32(step), contribs, jnp.float32(1.0), start=2, steps=3, target=1.0
        )
    assert float(state["scale"]["big"]) == balance.MAX_SCALE
    assert float(state["scale"]["small"]) == pytest.approx(1.0)


def test_monitor_reports_ratios_and_warns_with_a_suggested_weight(caplog):
    terms = plan.terms(config())
    monitor = balance.Monitor(config(), terms)
    rows = [{"student/loss": 2.0, "distill/big": 24.0, "distill/small": 1.0} for _ in range(6)]
    caplog.set_level(logging.INFO)
    assert monitor.observe([1, 2, 3], rows[:3]) is None  # the window (log steps 3-5) is open
    means = monitor.observe([4, 5, 6], rows[3:])
    assert means == pytest.approx({"big": 12.0, "small": 0.5})
    text = caplog.text
    assert "big 12x" in text and "small 0.5x" in text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'big' stays 12.0x" in warnings[0].getMessage()
    assert "weight 0.04167 would bring it to 1x (current weight 0.5)" in warnings[0].getMessage()
    assert monitor.observe([7], rows[:1]) is None  # reported once


def test_monitor_is_quiet_under_auto_balance_and_after_a_late_resume(caplog):
    caplog.set_level(logging.INFO)
    rows = [{"student/loss": 1.0, "distill/big": 50.0, "distill/small": 1.0}] * 3
    monitor = balance.Monitor(config(auto=True), plan.terms(config(auto=True)))
    assert monitor.observe([3, 4, 5], rows) == pytest.approx({"big": 50.0, "small": 1.0})
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    late = balance.Monitor(config(), plan.terms(config()))
    assert late.observe([90, 91, 92], rows) is None


def test_init_from_teacher_takes_every_non_backbone_weight():
    student = {
        "backbone": {"w": jnp.zeros(3)},
        "neck": {"w": jnp.zeros(2)},
        "bbox_head": {"w": jnp.zeros(4)},
    }
    teacher = {
        "params": {
            "backbone": {"w": jnp.ones(5)},  # another depth: never read
            "neck": {"w": jnp.ones(2)},
            "bbox_head": {"w": jnp.full(4, 2.0)},
        },
        "batch_stats": {"backbone": {"m": jnp.ones(5)}},
    }
    params, stats = experiment.inherit_from_teacher(
        student, {"backbone": {"m": jnp.zeros(3)}}, teacher
    )
    np.testing.assert_array_equal(params["backbone"]["w"], 0.0)
    np.testing.assert_array_equal(params["neck"]["w"], 1.0)
    np.testing.assert_array_equal(params["bbox_head"]["w"], 2.0)
    np.testing.assert_array_equal(stats["backbone"]["m"], 0.0)
    # copies: the donated training state must not hold the teacher's buffers
    theirs = teacher["params"]["neck"]["w"]
    assert params["neck"]["w"].unsafe_buffer_pointer() != theirs.unsafe_buffer_pointer()
    teacher["params"]["neck"]["w"] = jnp.ones(3)
    with pytest.raises(ValueError, match="student's parameters 'neck' differs"):
        experiment.inherit_from_teacher(student, {}, teacher)


def test_monitor_without_distillation_reports_nothing():
    plain = ml_collections.ConfigDict(dict(distill=None))
    monitor = balance.Monitor(plain, [])
    assert monitor.observe([1, 2], [{"loss": 1.0}, {"loss": 1.0}]) is None
