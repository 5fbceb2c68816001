"""The crop of the official COCO pipeline: sanitised box, square padding, inverse affine."""

import numpy as np
import pytest
from locllm_sdk.crop import (
    BoxError,
    box_to_center_scale,
    crop_geometry,
    normalize,
    sanitize_box,
    to_image_coords,
    warp,
)


def test_sanitize_uses_one_pixel_less():
    assert sanitize_box([10, 20, 30, 40], 100, 100) == (10, 20, 29, 39)
    assert sanitize_box([-5, -5, 30, 40], 100, 100) == (0, 0, 29, 39)
    assert sanitize_box([90, 90, 30, 40], 100, 100) == (90, 90, 9, 9)
    with pytest.raises(BoxError):
        sanitize_box([10, 10, -1, 5], 100, 100)
    with pytest.raises(BoxError):
        sanitize_box([120, 10, 5, 5], 100, 100)
    with pytest.raises(BoxError):
        sanitize_box([1, 2, 3], 100, 100)


def test_center_scale_pads_to_square_without_enlargement():
    c, s = box_to_center_scale((10, 20, 100, 50))
    np.testing.assert_allclose(c, [60, 45])
    np.testing.assert_allclose(s, [0.5, 0.5])


def test_geometry_maps_box_to_crop_and_back():
    g = crop_geometry([30, 40, 81, 161], (300, 200), 224)
    # sanitised box (30, 40, 80, 160): centre (70, 120), padded side 160
    centre = g.forward @ np.array([70, 120, 1.0])
    np.testing.assert_allclose(centre, [112, 112], atol=1e-4)
    top = g.forward @ np.array([70, 40, 1.0])
    np.testing.assert_allclose(top, [112, 0], atol=1e-4)
    pts = np.array([[0, 0], [224, 224], [37.5, 100.25]])
    back = to_image_coords(pts, g.inverse)
    fwd = np.c_[back, np.ones(3)] @ g.forward.T
    np.testing.assert_allclose(fwd, pts, atol=1e-3)


def test_warp_and_normalize():
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 40:60] = 255
    g = crop_geometry([30, 30, 41, 41], (100, 100), 56)
    crop = warp(img, g)
    assert crop.shape == (56, 56, 3)
    assert crop[28, 28].tolist() == [255, 255, 255] and crop[2, 2].tolist() == [0, 0, 0]
    x = normalize(crop[None])
    assert x.shape == (1, 3, 56, 56) and x.dtype == np.float32
    assert x[0, 0, 28, 28] == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-6)
