import numpy as np
import pytest

from jdistill import checkpoint


def model_tree():
    return {
        "params": {
            "backbone": {"conv1": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
            "head": {"cls": {"bias": np.zeros((4,), np.float32)}},
        },
        "batch_stats": {"backbone": {"bn1": {"mean": np.zeros((8,), np.float32)}}},
    }


def test_exact_match_merges_values():
    loaded = model_tree()
    loaded["params"]["head"]["cls"]["bias"] = np.arange(4, dtype=np.float32)
    out = checkpoint.check_and_merge(loaded, model_tree())
    np.testing.assert_array_equal(out["params"]["head"]["cls"]["bias"], np.arange(4))


def test_every_mismatch_is_listed_in_one_error():
    loaded = model_tree()
    loaded["params"]["head"]["cls_renamed"] = loaded["params"]["head"].pop("cls")
    loaded["params"]["backbone"]["conv1"]["kernel"] = np.zeros((3, 3, 3, 16), np.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.check_and_merge(loaded, model_tree(), what="teacher /x")
    msg = str(e.value)
    assert "teacher /x" in msg
    assert "missing key: params/head/cls/bias" in msg
    assert "unexpected key: params/head/cls_renamed/bias" in msg
    assert "shape mismatch: params/backbone/conv1/kernel: checkpoint (3, 3, 3, 16)" in msg


def test_skip_patterns_keep_model_values():
    loaded = model_tree()
    loaded["params"]["head"]["cls"]["bias"] = np.zeros((81,), np.float32)  # other class count
    out = checkpoint.check_and_merge(loaded, model_tree(), skip=(r"head/cls",))
    assert out["params"]["head"]["cls"]["bias"].shape == (4,)
