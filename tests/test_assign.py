import jax.numpy as jnp
import numpy as np

from jdistill.ops import assign

PRIORS = jnp.array(
    [
        [0.0, 0.0, 10.0, 10.0],  # 0: IoU 1 with gt0
        [0.0, 0.0, 10.0, 20.0],  # 1: IoU .5 with gt0
        [5.0, 0.0, 15.0, 10.0],  # 2: IoU 1/3 with gt0
        [40.0, 40.0, 50.0, 50.0],  # 3: IoU .45 with gt1 (ignored band)
        [100.0, 100.0, 110.0, 110.0],  # 4: far from everything
    ]
)
GTS = jnp.array([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 51.0, 51.0], [0.0, 0.0, 0.0, 0.0]])


def run(prior_valid=None, gt_valid=None, **kw):
    pv = jnp.ones(5, bool) if prior_valid is None else prior_valid
    gv = jnp.array([True, True, False]) if gt_valid is None else gt_valid
    args = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0) | kw
    out, max_iou = assign.max_iou_assign(PRIORS, pv, GTS, gv, **args)
    return np.asarray(out), np.asarray(max_iou)


def test_retinanet_thresholds_by_hand():
    out, max_iou = run(match_low_quality=False)
    # IoU(prior3, gt1) = 100 / 121 = 0.826 -> positive
    np.testing.assert_allclose(max_iou[:3], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_array_equal(out, [1, 1, 0, 2, 0])


def test_ignored_band_and_low_quality_match():
    gts = GTS.at[1].set(jnp.array([40.0, 40.0, 50.0, 55.0]))  # IoU with prior3 = 100/150
    gts = gts.at[1].set(jnp.array([38.0, 38.0, 52.0, 52.0]))  # IoU = 100/196 = 0.51
    out, _ = assign.max_iou_assign(
        PRIORS,
        jnp.ones(5, bool),
        gts,
        jnp.array([True, True, False]),
        pos_iou_thr=0.6,
        neg_iou_thr=0.4,
        min_pos_iou=0.0,
        match_low_quality=False,
    )
    # prior1 (IoU .5) and prior3 (.51) fall between .4 and .6 -> ignored (-1)
    np.testing.assert_array_equal(np.asarray(out), [1, -1, 0, -1, 0])
    out, _ = assign.max_iou_assign(
        PRIORS,
        jnp.ones(5, bool),
        gts,
        jnp.array([True, True, False]),
        pos_iou_thr=0.6,
        neg_iou_thr=0.4,
        min_pos_iou=0.0,
        match_low_quality=True,
    )
    # gt1's best prior is prior3: the low-quality step makes it positive for gt1
    np.testing.assert_array_equal(np.asarray(out), [1, -1, 0, 2, 0])


def test_later_gt_overwrites_equal_best():
    priors = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    gts = jnp.array([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 10.0]])  # both IoU .5
    out, _ = assign.max_iou_assign(
        priors,
        jnp.ones(1, bool),
        gts,
        jnp.ones(2, bool),
        pos_iou_thr=0.7,
        neg_iou_thr=0.3,
        min_pos_iou=0.3,
    )
    assert int(out[0]) == 2  # argmax picks gt0, the low-quality loop's last gt (gt1) wins


def test_min_pos_iou_gates_low_quality():
    priors = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    gts = jnp.array([[0.0, 0.0, 10.0, 40.0]])  # IoU .25
    out, _ = assign.max_iou_assign(
        priors,
        jnp.ones(1, bool),
        gts,
        jnp.ones(1, bool),
        pos_iou_thr=0.7,
        neg_iou_thr=0.3,
        min_pos_iou=0.3,
    )
    assert int(out[0]) == 0


def test_empty_ground_truth_is_all_negative():
    out, max_iou = run(gt_valid=jnp.zeros(3, bool))
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0])
    assert (max_iou == -1).all()


def test_invalid_priors_are_ignored_and_never_best():
    out, _ = run(prior_valid=jnp.array([False, True, True, True, True]))
    # prior0 is invalid: -1; gt0's best valid prior is prior1 (IoU .5) -> positive anyway
    np.testing.assert_array_equal(out, [-1, 1, 0, 2, 0])


def test_low_quality_ties_survive_an_ulp_of_rounding():
    """Two anchors shifted symmetrically about a box overlap it equally; an IoU rounded one ulp
    lower (what another compiled program may compute) still ties, a real difference does not."""
    gt = jnp.array([[10.0, 10.0, 30.0, 30.0]])
    x2 = np.float32(35.0)
    priors = jnp.array(
        [
            [5.0, 10.0, 25.0, 30.0],  # IoU 15*20 / (2*400 - 300) = 0.6
            [15.0, 10.0, np.nextafter(x2, np.float32(40)), 30.0],  # the same, an ulp wider
            [15.1, 10.0, 35.1, 30.0],  # really less overlap
        ]
    )
    got, max_iou = assign.max_iou_assign(
        priors,
        jnp.ones(3, bool),
        gt,
        jnp.ones(1, bool),
        pos_iou_thr=0.9,
        neg_iou_thr=0.3,
        min_pos_iou=0.0,
    )
    assert max_iou[0] != max_iou[1]  # the tie is broken by rounding alone
    np.testing.assert_array_equal(got, [1, 1, -1])
