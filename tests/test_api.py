"""`wsss predict` and the Python API (wsss.load_model / Segmenter) on a checkpoint of a tiny training run:
odd sizes and image modes, an unreadable file, probabilities, and the same labels and mIoU as
`evaluate_checkpoint` on the demo val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.io import read_label_png
from wsss.errors import DatasetError, WsssError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NUM_CLASSES = 3  # background + the two digits of the demo_data fixture (tests/conftest.py)
# the tiny run of tests/conftest.py (mit_tiny, crop 64, 6 iterations) on the CPU, no validation
EXTRAS = ["train.device=cpu", "train.val_interval=0", "train.ckpt_interval=6", "train.log_interval=6"]
# long side 72 != the demo's 64: a prediction that skipped the resize would not match evaluate_checkpoint
FAST = ["train.device=cpu", "data.num_workers=0", "eval.long_side=72", "eval.scales=[1.0,0.5]", "eval.flip=true",
        "eval.crf_workers=0"]


@pytest.fixture(scope="module")
def trained(demo_data, train_tiny) -> tuple[Path, Path]:
    """(demo data root, checkpoint of a 6-iteration mit_tiny run on it)."""
    return demo_data, train_tiny("predict", demo_data, *EXTRAS)


def val_images(root: Path) -> list[Path]:
    return sorted((root / "JPEGImages").glob("val_*.jpg"))


def odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of odd sizes and PIL modes, plus one unreadable file -> name: expected label (H, W)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "odd.jpg")
    Image.fromarray(rgb[:, :, 0]).save(folder / "grey.png")  # mode L
    Image.fromarray(np.dstack([rgb, np.full((37, 53), 128, np.uint8)])).save(folder / "alpha.png")  # RGBA
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray((rgb[:, :, 1].astype(np.uint16) * 257)).save(folder / "deep.png")  # 16-bit grey
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display -> 53 x 37
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return {"odd": (37, 53), "grey": (37, 53), "alpha": (37, 53), "palette": (37, 53), "deep": (37, 53),
            "rotated": (53, 37)}


def test_predict_odd_sizes_and_modes_goes_on_past_an_unreadable_file(trained, tmp_path, wsss_here):
    _, ckpt = trained
    expected = odd_images(tmp_path / "in")
    out = tmp_path / "out"
    # one DataLoader worker process reads the images two at a time: the bad file must not stop it
    result = wsss_here("predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(out),
                       "--overlay", "--probs", "--workers", "1", "--batch-size", "2", *FAST)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cannot read '") and "broken.jpg'" in errors[0]
    assert f"wrote {len(expected)} label maps with overlays and probabilities" in result.stdout
    assert "1 image failed" in result.stdout and "background" in result.stdout
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(expected)
    for name, size in expected.items():
        label = read_label_png(out / f"{name}.png")
        assert label.shape == size and label.max() < NUM_CLASSES
        assert Image.open(out / f"{name}.png").mode == "P"
        assert Image.open(out / "overlay" / f"{name}.png").size == size[::-1]
        with np.load(out / f"{name}.npz") as npz:
            probs = npz["probs"]
        assert probs.dtype == np.float16 and probs.shape == (NUM_CLASSES, *size)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
        assert (probs.astype(np.float32).argmax(0) == label).mean() > 0.99  # float16 rounding may flip near-ties


def test_modes_convert_like_the_rgb_image(tmp_path):
    from wsss.api import read_rgb, to_rgb

    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(read_rgb(tmp_path / "deep.png"), np.repeat(rgb[:, :, 1:2], 3, axis=2))
    Image.fromarray(np.dstack([rgb, np.zeros((5, 7), np.uint8)])).save(tmp_path / "alpha.png")
    assert np.array_equal(read_rgb(tmp_path / "alpha.png"), rgb)
    assert np.array_equal(to_rgb(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2))
    with pytest.raises(DatasetError, match=r"cannot read '.*missing.png': no such file"):
        read_rgb(tmp_path / "missing.png")
    with pytest.raises(DatasetError, match="uint8"):
        to_rgb(rgb.astype(np.float32))


@pytest.mark.parametrize("msc, crf", [(False, False), (True, False), (True, True)])
def test_predict_over_val_gives_the_labels_and_miou_of_evaluate_checkpoint(trained, tmp_path, wsss_here, msc, crf):
    from wsss.engine.evaluation import evaluate_prediction_dir
    from wsss.engine.inference import evaluate_checkpoint

    if crf:
        pytest.importorskip("pydensecrf.densecrf")
    root, ckpt = trained
    out = tmp_path / "pred"
    glob = str(root / "JPEGImages" / "val_*.jpg")  # a quoted glob, expanded by wsss predict
    result = wsss_here("predict", "--checkpoint", str(ckpt), glob, "--out", str(out),
                       "--msc" if msc else "--no-msc", "--crf" if crf else "--no-crf", *FAST)
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "eval"
    expected = evaluate_checkpoint(ckpt, split="val", target="seg", msc=msc, crf=crf, save_dir=saved,
                                   overrides=FAST)
    names = [p.stem for p in val_images(root)]
    labels = [read_label_png(out / f"{n}.png") for n in names]
    for name, label in zip(names, labels):
        assert np.array_equal(label, read_label_png(saved / f"{name}.png")), name
    assert len(np.unique(np.concatenate([x.ravel() for x in labels]))) > 1  # not a constant prediction
    assert evaluate_prediction_dir(out, root, split="val")["miou"] == pytest.approx(expected["miou"], abs=1e-9)


def test_msc_and_flip_change_the_prediction(trained):
    import wsss

    root, ckpt = trained
    model = wsss.load_model(ckpt, overrides=FAST)
    plain = model.predict_proba(val_images(root)[:1])[0]
    assert not np.allclose(plain, model.predict_proba(val_images(root)[:1], flip=True)[0])
    assert not np.allclose(plain, model.predict_proba(val_images(root)[:1], msc=True)[0])


def test_python_api_takes_paths_pil_images_and_arrays(trained):
    import wsss

    root, ckpt = trained
    model = wsss.load_model(str(ckpt), overrides=FAST)
    assert isinstance(model, wsss.Segmenter) and model.device.type == "cpu"
    assert model.class_names[0] == "background" and len(model.class_names) == NUM_CLASSES
    assert model.config.eval.long_side == 72 and model.to("cpu") is model
    path = val_images(root)[0]
    array = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_pil, by_array = model.predict([path, Image.open(path), array])
    assert by_path.dtype == np.uint8 and by_path.shape == array.shape[:2]
    assert np.array_equal(by_path, by_pil) and np.array_equal(by_path, by_array)
    assert np.array_equal(model.predict(path)[0], by_path)  # one image, not in a list
    (probs,) = model.predict_proba([array])
    assert probs.dtype == np.float32 and probs.shape == (NUM_CLASSES, *array.shape[:2])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(0), by_path)
    with pytest.raises(DatasetError, match="cannot read"):
        model.predict([root / "nothing.jpg"])
    with pytest.raises(WsssError, match="target must be one of"):
        model.predict([array], target="crf")


@pytest.mark.parametrize("target", ["cam", "afa"])
def test_cam_targets_use_the_predicted_classes(trained, target):
    import wsss

    root, ckpt = trained
    model = wsss.load_model(ckpt, overrides=FAST, target=target, msc=True)
    (prediction,) = list(model.iter_predictions(val_images(root)[:1], with_probs=True))
    assert prediction.classes and all(1 <= c < NUM_CLASSES for c in prediction.classes)
    present = set(np.unique(prediction.label).tolist())
    assert present <= {0, *prediction.classes}
    absent = [c for c in range(1, NUM_CLASSES) if c not in prediction.classes]
    assert all(prediction.probs[c].max() == 0 for c in absent)  # CAMs only of the predicted classes
    with pytest.raises(WsssError, match="needs msc"):
        model.predict(val_images(root)[:1], msc=False, flip=True)


def test_output_names_keep_relative_paths_only_for_colliding_stems(tmp_path):
    from wsss.engine.predict import collect_images, output_names

    for rel in ("a/x.jpg", "b/x.jpg", "b/y.jpg", "c/z.jpg", "c/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files, problems = collect_images([tmp_path / "a", tmp_path / "b", str(tmp_path / "c" / "*"),
                                      tmp_path / "a" / "x.jpg", str(tmp_path / "none*.jpg")])
    assert problems == [f"no file matches '{tmp_path / 'none*.jpg'}'"]
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/x.jpg", "b/x.jpg", "b/y.jpg", "c/z.jpg",
                                                                   "c/z.png"]
    assert output_names(files) == ["a/x", "b/x", "y", "c/z.jpg", "c/z.png"]


def test_predict_without_images_is_one_error_line(trained, tmp_path, wsss_here):
    _, ckpt = trained
    (tmp_path / "empty").mkdir()
    result = wsss_here("predict", "--checkpoint", str(ckpt), str(tmp_path / "empty"), "--out",
                       str(tmp_path / "out"), *FAST)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: directory '{tmp_path / 'empty'}' holds no image files "
                                                  "(.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)"]
