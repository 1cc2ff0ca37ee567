"""VOC AP on hand-made cases with known answers, difficult boxes included."""

import numpy as np
import pytest

from jdistill.evaluate import voc


def _det(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, float).reshape(-1, 4),
        "scores": np.asarray(scores, float),
        "labels": np.asarray(labels),
    }


def _gt(boxes, labels, difficult):
    return {
        "bbox": np.asarray(boxes, float).reshape(-1, 4),
        "label": np.asarray(labels),
        "is_difficult": np.asarray(difficult, bool),
    }


def test_hand_case_with_difficult_and_duplicates():
    # Image A: gts g1 (easy) and g2 (difficult). Image B: gt g3 (easy). Class 0 only.
    gts = [
        _gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [False, True]),
        _gt([[0, 0, 10, 10]], [0], [False]),
    ]
    dets = [
        # 0.9 hits g1 (TP); 0.8 hits the difficult g2 (ignored); 0.7 duplicates g1 (FP)
        _det([[0, 0, 10, 10], [20, 20, 30, 30], [1, 0, 10, 10]], [0.9, 0.8, 0.7], [0, 0, 0]),
        # 0.6 misses g3 (IoU 25/175 < 0.5: FP); 0.5 hits g3 (TP)
        _det([[5, 5, 15, 20], [0, 0, 10, 11]], [0.6, 0.5], [0, 0]),
    ]
    # Sorted: TP(.9) FP(.7) FP(.6) TP(.5); 2 gts -> recall .5 .5 .5 1, precision 1 .5 .33 .5
    m11 = voc.evaluate(gts, dets, ["a"], "11points")
    # 11 points: t = 0..0.5 -> max precision at recall >= t is 1 (6 points); 0.6..1.0 -> 0.5 (5)
    assert m11["mAP"] == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    assert m11["AP50/a"] == m11["mAP"] and m11["num_gts/a"] == 2
    # area: envelope 1 on recall [0, .5], 0.5 on (.5, 1] -> 0.75
    assert voc.evaluate(gts, dets, ["a"], "area")["mAP"] == pytest.approx(0.75)


def test_classes_without_gts_are_left_out_of_the_mean():
    gts = [_gt([[0, 0, 10, 10]], [1], [False])]
    dets = [_det([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 0])]
    m = voc.evaluate(gts, dets, ["a", "b"])
    assert m["AP50/b"] == pytest.approx(1.0) and "AP50/a" not in m and m["mAP"] == 1.0


def test_only_difficult_gts_make_a_class_count_zero():
    gts = [_gt([[0, 0, 10, 10]], [0], [True])]
    m = voc.evaluate(gts, [_det([[0, 0, 10, 10]], [0.9], [0])], ["a"])
    assert m["num_gts/a"] == 0 and m["mAP"] == 0.0


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="11points"):
        voc.evaluate([], [], ["a"], mode="voc12")
