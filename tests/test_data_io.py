"""Label PNG and image reading / writing (wsss.data.io)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsss.data.io import VOC_PALETTE, image_size, read_image, read_label_png, write_label_png
from wsss.errors import DatasetError


def test_voc_palette_is_the_standard_colour_map():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]  # person
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]  # ignore
    assert len({tuple(c) for c in VOC_PALETTE}) == 256


def test_label_png_round_trip_is_exact_and_palette_mode(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, size=(13, 17)).astype(np.uint8)
    label[0, :5] = 255
    path = tmp_path / "sub" / "x.png"
    write_label_png(path, label)
    with Image.open(path) as img:
        assert img.mode == "P"
        palette = np.array(img.getpalette()[: 256 * 3], dtype=np.uint8).reshape(256, 3)
    assert np.array_equal(palette, VOC_PALETTE)
    back = read_label_png(path)
    assert back.dtype == np.uint8 and np.array_equal(back, label)


def test_write_label_png_accepts_int_arrays(tmp_path):
    label = np.array([[0, 3], [255, 20]], dtype=np.int64)
    write_label_png(tmp_path / "x.png", label)
    assert np.array_equal(read_label_png(tmp_path / "x.png"), label.astype(np.uint8))


def test_read_label_png_reads_greyscale_and_rgb_palette_pictures(tmp_path):
    label = np.array([[0, 1, 2], [15, 255, 20]], dtype=np.uint8)
    Image.fromarray(label).save(tmp_path / "grey.png")  # SBD-style mode "L"
    Image.fromarray(VOC_PALETTE[label]).save(tmp_path / "rgb.png")  # colour picture of the label
    assert np.array_equal(read_label_png(tmp_path / "grey.png"), label)
    assert np.array_equal(read_label_png(tmp_path / "rgb.png"), label)


def test_read_label_png_rejects_rgb_colours_outside_the_palette(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(DatasetError, match=r"odd\.png.*\(1, 2, 3\)"):
        read_label_png(tmp_path / "odd.png")


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 3), np.uint8), np.full((2, 2), 300), np.full((2, 2), -1)])
def test_write_label_png_rejects_bad_arrays(tmp_path, bad):
    with pytest.raises(DatasetError, match="bad.png"):
        write_label_png(tmp_path / "bad.png", bad)


def test_read_image_gives_rgb_uint8(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 1], grey)
    assert image_size(tmp_path / "g.png") == (3, 4)


def test_read_image_names_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match=r"nothere\.jpg' does not exist"):
        read_image(tmp_path / "nothere.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"broken\.jpg' is not a readable image"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(DatasetError, match=r"broken\.jpg' is not a readable image"):
        image_size(tmp_path / "broken.jpg")
    with pytest.raises(DatasetError, match=r"broken\.jpg' is not a readable image"):
        read_label_png(tmp_path / "broken.jpg")
