import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jdistill import config_lib, optim


def sched(**kw):
    c = config_lib.step_schedule()
    c.update(kw)
    return c


def test_linear_warmup_and_steps_follow_mmdetection():
    fn, total = optim.lr_schedule(config_lib.sgd(0.01), sched(), steps_per_epoch=1000)
    assert total == 12000
    np.testing.assert_allclose(fn(0), 0.01 * 0.001, rtol=1e-5)
    np.testing.assert_allclose(fn(250), 0.01 * (1 - 0.5 * 0.999), rtol=1e-5)
    np.testing.assert_allclose(fn(500), 0.01, rtol=1e-6)
    np.testing.assert_allclose(fn(7999), 0.01, rtol=1e-6)
    np.testing.assert_allclose(fn(8000), 0.001, rtol=1e-5)  # epoch 8
    np.testing.assert_allclose(fn(11000), 0.0001, rtol=1e-5)  # epoch 11


def test_constant_warmup_and_num_steps_override():
    fn, total = optim.lr_schedule(
        config_lib.sgd(0.01), sched(warmup="constant", warmup_ratio=1 / 3, num_steps=1200), 7
    )
    assert total == 1200
    np.testing.assert_allclose(fn(10), 0.01 / 3, rtol=1e-5)
    np.testing.assert_allclose(fn(799), 0.01, rtol=1e-5)
    np.testing.assert_allclose(fn(800), 0.001, rtol=1e-5)  # milestone 8/12 of 1200
    with pytest.raises(ValueError, match="warmup"):
        optim.lr_schedule(config_lib.sgd(0.01), sched(warmup="cosine"), 7)


def test_sgd_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(3)]
    lr = 0.1
    model_cfg = ml_collections.ConfigDict(dict(frozen_stages=-1, norm_trainable=True))
    params = {"student": {"head": {"w": jnp.asarray(w0)}}}
    tx = optim.make_optimizer(config_lib.sgd(lr), model_cfg, params, lambda i: lr)
    state = tx.init(params)
    for g in grads:
        upd, state = tx.update({"student": {"head": {"w": jnp.asarray(g)}}}, state, params)
        params = optax.apply_updates(params, upd)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=1e-4)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    np.testing.assert_allclose(params["student"]["head"]["w"], p.detach().numpy(), rtol=1e-5)


def test_frozen_stages_and_frozen_bn_get_no_update():
    params = {
        "student": {
            "backbone": {
                "conv1": {"conv": {"kernel": jnp.ones(3)}},
                "bn1": {"scale": jnp.ones(3)},
                "layer1_0": {"conv1": {"conv": {"kernel": jnp.ones(3)}}},
                "layer2_0": {
                    "conv1": {"conv": {"kernel": jnp.ones(3)}},
                    "bn1": {"scale": jnp.ones(3)},
                },
            },
            "neck": {"lateral_convs_0": {"conv": {"kernel": jnp.ones(3)}}},
        },
        "adapters": {"frs_feat": {"level_0": {"kernel": jnp.ones(3)}}},
    }
    cfg = ml_collections.ConfigDict(dict(frozen_stages=1, norm_trainable=True))
    labels = optim.trainable_labels(params, cfg)
    b = labels["student"]["backbone"]
    assert b["conv1"]["conv"]["kernel"] == "frozen" and b["bn1"]["scale"] == "frozen"
    assert b["layer1_0"]["conv1"]["conv"]["kernel"] == "frozen"
    assert b["layer2_0"]["conv1"]["conv"]["kernel"] == "train"
    assert labels["adapters"]["frs_feat"]["level_0"]["kernel"] == "train"
    cfg.norm_trainable = False  # FCOS: BN fully frozen
    assert (
        optim.trainable_labels(params, cfg)["student"]["backbone"]["layer2_0"]["bn1"]["scale"]
        == "frozen"
    )
    tx = optim.make_optimizer(config_lib.sgd(0.1), cfg, params, lambda i: 0.1)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    np.testing.assert_array_equal(
        new["student"]["backbone"]["layer1_0"]["conv1"]["conv"]["kernel"], 1.0
    )
    assert float(new["student"]["backbone"]["layer2_0"]["conv1"]["conv"]["kernel"][0]) < 1.0
