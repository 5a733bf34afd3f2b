"""COCO: instances JSON -> VOC-style label PNGs (convert_coco_masks), then the COCO dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config import DataConfig
from wsss.data.coco import COCO_CLASSES, convert_coco_masks
from wsss.data.datasets import build_dataset, guess_dataset_kind
from wsss.data.io import read_label_png
from wsss.errors import DatasetError

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

# pycocotools' own numpy-2 deprecation notice, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.mask")

H, W = 20, 30
PERSON, DOG, TOOTHBRUSH = 1, 2, 3  # labels of category ids 1, 18, 90 in sorted-id order


def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed_rle(binary: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros (the COCO 'counts' list form)."""
    flat = binary.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [H, W]}


def compressed_rle(binary: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(binary))
    return {"counts": rle["counts"].decode("ascii"), "size": [H, W]}


SMALL_PERSON = rect(6, 10, 8, 12)  # lies on the dog
CROWD = rect(0, 8, 14, 30)  # crowd of people overlapping the dog's top-right corner
SBRUSH = rect(3, 9, 4, 26)


def write_coco(coco_root: Path) -> Path:
    """val2014 with 3 images: (1) a dog polygon with a smaller person on it and a crowd region
    overlapping it, (2) only a crowd, (3) a toothbrush as compressed RLE. Categories are listed
    out of id order, the person's annotation id is lower than the dog's."""
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": H, "width": W} for i in (42, 7, 99)]
    (coco_root / "val2014").mkdir(parents=True)
    for k, img in enumerate(images):
        pixels = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(coco_root / "val2014" / img["file_name"])
    dog_polygon = [4.0, 2.0, 24.0, 2.0, 24.0, 16.0, 4.0, 16.0]  # x, y corners: x 4..24, y 2..16
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0, "segmentation": uncompressed_rle(SMALL_PERSON),
         "area": 16.0, "bbox": [8, 6, 4, 4]},
        {"id": 2, "image_id": 42, "category_id": 18, "iscrowd": 0, "segmentation": [dog_polygon],
         "area": 280.0, "bbox": [4, 2, 20, 14]},
        {"id": 3, "image_id": 42, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(CROWD),
         "area": 128.0, "bbox": [14, 0, 16, 8]},
        {"id": 4, "image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(CROWD),
         "area": 128.0, "bbox": [14, 0, 16, 8]},
        {"id": 5, "image_id": 99, "category_id": 90, "iscrowd": 0, "segmentation": compressed_rle(SBRUSH),
         "area": 132.0, "bbox": [4, 3, 22, 6]},
    ]
    categories = [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                  {"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 18, "name": "dog", "supercategory": "animal"}]
    (coco_root / "annotations").mkdir()
    (coco_root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return coco_root


@pytest.fixture()
def converted(tmp_path) -> Path:
    coco_root = write_coco(tmp_path / "coco")
    return convert_coco_masks(coco_root, tmp_path / "out", splits=("val",))


def test_category_ids_map_to_labels_in_sorted_id_order(converted):
    assert (converted / "classes.txt").read_text().split("\n")[:4] == ["background", "person", "dog", "toothbrush"]


def test_smaller_instances_stay_on_top_and_instances_win_over_crowd(converted):
    mask = read_label_png(converted / "SegmentationClass/val/COCO_val2014_000000000042.png")
    assert mask.shape == (H, W)
    assert (mask[SMALL_PERSON == 1] == PERSON).all()  # painted after the larger dog
    dog_core = rect(3, 15, 5, 23).astype(bool) & (SMALL_PERSON == 0)
    assert (mask[dog_core] == DOG).all()
    crowd_only = (CROWD == 1) & (mask != DOG)
    assert crowd_only.sum() > 50 and (mask[crowd_only] == 255).all()
    assert (mask[(CROWD == 1) & dog_core] == DOG).all()  # the instance wins over the crowd
    assert set(np.unique(mask).tolist()) == {0, PERSON, DOG, 255}


def test_compressed_rle_and_crowd_only_images(converted):
    brush = read_label_png(converted / "SegmentationClass/val/COCO_val2014_000000000099.png")
    assert np.array_equal(brush, SBRUSH * TOOTHBRUSH)
    crowd = read_label_png(converted / "SegmentationClass/val/COCO_val2014_000000000007.png")
    assert np.array_equal(crowd, CROWD * 255)
    # The split lists only images with a foreground class, in image-id order.
    assert (converted / "ImageSets/val.txt").read_text().split() == [
        "COCO_val2014_000000000042", "COCO_val2014_000000000099"]


def test_images_are_symlinked_or_copied(tmp_path):
    coco_root = write_coco(tmp_path / "coco")
    linked = convert_coco_masks(coco_root, tmp_path / "linked", splits=("val",))
    image = linked / "JPEGImages/val/COCO_val2014_000000000042.jpg"
    assert image.is_symlink() and image.resolve() == (coco_root / "val2014" / image.name).resolve()
    copied = convert_coco_masks(coco_root, tmp_path / "copied", splits=("val",), copy_images=True)
    image = copied / "JPEGImages/val/COCO_val2014_000000000042.jpg"
    assert image.is_file() and not image.is_symlink()
    again = convert_coco_masks(coco_root, tmp_path / "linked", splits=("val",))  # re-running is fine
    assert (again / "JPEGImages/val/COCO_val2014_000000000042.jpg").is_symlink()


def test_coco_dataset_reads_the_converted_layout(converted):
    data_cfg = DataConfig(dataset="coco", root=str(converted), val_split="val")
    ds = build_dataset(data_cfg, "val", train=False)
    assert ds.names == ["COCO_val2014_000000000042", "COCO_val2014_000000000099"]
    assert ds.class_names == ["background", "person", "dog", "toothbrush"]
    assert ds.image_labels.tolist() == [[1, 1, 0], [0, 0, 1]]
    item = ds[0]
    assert item["mask"].shape == (H, W) and item["size"].tolist() == [H, W]
    assert guess_dataset_kind(converted) == "coco"


def test_coco_split_without_list_file_is_the_mask_directory_listing(converted):
    (converted / "ImageSets/val.txt").unlink()
    ds = build_dataset(DataConfig(dataset="coco", root=str(converted)), "val", train=False)
    assert ds.names == ["COCO_val2014_000000000007", "COCO_val2014_000000000042", "COCO_val2014_000000000099"]


def test_coco_dataset_without_classes_txt_has_the_81_coco_classes(converted):
    (converted / "classes.txt").unlink()
    ds = build_dataset(DataConfig(dataset="coco", root=str(converted)), "val", train=False)
    assert ds.num_classes == 81 and ds.class_names[1:] == list(COCO_CLASSES) and len(COCO_CLASSES) == 80


def test_coco_missing_pieces_are_named(tmp_path):
    coco_root = write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match=r"instances_train2014\.json' does not exist"):
        convert_coco_masks(coco_root, tmp_path / "out", splits=("train",))
    (coco_root / "val2014" / "COCO_val2014_000000000099.jpg").unlink()
    with pytest.raises(DatasetError, match=r"COCO_val2014_000000000099\.jpg' \(image id 99"):
        convert_coco_masks(coco_root, tmp_path / "out", splits=("val",))
    with pytest.raises(DatasetError, match=r"JPEGImages/val' does not exist"):
        build_dataset(DataConfig(dataset="coco", root=str(tmp_path)), "val", train=False)
