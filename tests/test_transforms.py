import numpy as np
import pytest

from jdistill.data import transforms


@pytest.mark.parametrize(
    "hw, scale, want",
    [
        ((480, 640), (1333, 800), (800, 1067)),  # factor 800/480
        ((427, 640), (1333, 800), (800, 1199)),  # 640 * 800/427 = 1199.06
        ((500, 1500), (1333, 800), (444, 1333)),  # long side binds: 1333/1500
        ((100, 160), (160, 128), (100, 160)),  # already fits exactly
    ],
)
def test_rescale_size_rounding(hw, scale, want):
    h, w, _ = transforms.rescale_size(*hw, scale)
    assert (h, w) == want


def test_resize_matches_torch_bilinear_half_pixel():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for out_hw in [(74, 106), (20, 31), (50, 40)]:
        ours = transforms.resize_bilinear(img, *out_hw).astype(np.int32)
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        ref = torch.nn.functional.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)
        ref = ref[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.int32)
        assert np.abs(ours - ref).max() <= 1


def test_resize_scales_and_clips_boxes():
    img = np.zeros((480, 640, 3), np.uint8)
    boxes = np.array([[10.0, 20.0, 650.0, 100.0]], np.float32)
    out, b, sf = transforms.resize(img, boxes, (1333, 800))
    assert out.shape == (800, 1067, 3)
    np.testing.assert_allclose(sf, [1067 / 640, 800 / 480], rtol=1e-6)
    np.testing.assert_allclose(b[0], [10 * sf[0], 20 * sf[1], 1067.0, 100 * sf[1]], rtol=1e-5)


def test_hflip_boxes():
    img = np.arange(2 * 10 * 3, dtype=np.uint8).reshape(2, 10, 3)
    out, b = transforms.hflip(img, np.array([[1.0, 0.0, 4.0, 2.0]], np.float32))
    np.testing.assert_array_equal(out[:, 0], img[:, -1])
    np.testing.assert_allclose(b, [[6.0, 0.0, 9.0, 2.0]])


def test_canvas_padding_and_pad_shape():
    assert transforms.choose_canvas(800, 1067, [(800, 1344), (1344, 800)]) == (800, 1344)
    assert transforms.choose_canvas(1067, 800, [(800, 1344), (1344, 800)]) == (1344, 800)
    with pytest.raises(ValueError, match="no canvas"):
        transforms.choose_canvas(900, 900, [(800, 1344), (1344, 800)])
    img = np.full((3, 5, 3), 7, np.uint8)
    out = transforms.pad_to_canvas(img, (4, 8))
    assert out.shape == (4, 8, 3) and out[:3, :5].min() == 7 and out[3:].max() == 0
    assert transforms.pad_shape(800, 1067) == (800, 1088)


def test_pad_boxes_truncates_and_masks():
    b, lab, valid, dropped = transforms.pad_boxes(np.ones((5, 4), np.float32), np.arange(5), 3)
    assert b.shape == (3, 4) and valid.all() and dropped == 2
    b, lab, valid, dropped = transforms.pad_boxes(np.zeros((0, 4), np.float32), np.zeros(0), 3)
    assert not valid.any() and dropped == 0
