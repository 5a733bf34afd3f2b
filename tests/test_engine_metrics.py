"""ConfusionMatrix: hand-computed IoUs, ignore, absent classes, numpy/tensor parity, merge, table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsss.engine.metrics import ConfusionMatrix, ImageScores, format_table, to_json

# 4 classes; class 3 appears in neither ground truth nor prediction.
GT = np.array([[0, 0, 1, 1],
               [0, 2, 2, 255],
               [1, 1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 0, 2],
                 [1, 2, 2, 0]], dtype=np.uint8)
# Counted pixels (gt != 255): 10.  Confusion (rows gt, cols pred):
#   gt0: pred0 x2, pred1 x1          -> 3 pixels
#   gt1: pred1 x3, pred2 x1          -> 4 pixels
#   gt2: pred0 x1, pred2 x2          -> 3 pixels
EXPECTED = np.array([[2, 1, 0, 0],
                     [0, 3, 1, 0],
                     [1, 0, 2, 0],
                     [0, 0, 0, 0]])
# IoU: c0 = 2 / (3 + 3 - 2) = 0.5; c1 = 3 / (4 + 4 - 3) = 0.6; c2 = 2 / (3 + 3 - 2) = 0.5; c3 = NaN.
EXPECTED_IOU = [50.0, 60.0, 50.0]


def test_confusion_matrix_matches_hand_count_and_ignores_255():
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    np.testing.assert_array_equal(cm.matrix.numpy(), EXPECTED)
    result = cm.compute()
    assert result["iou"][:3] == pytest.approx(EXPECTED_IOU)
    assert math.isnan(result["iou"][3])
    assert result["miou"] == pytest.approx(sum(EXPECTED_IOU) / 3)  # class 3 left out of the mean
    assert result["pixel_acc"] == pytest.approx(70.0)  # 7 of 10 counted pixels
    assert result["mean_acc"] == pytest.approx(100 * (2 / 3 + 3 / 4 + 2 / 3) / 3)
    assert result["num_pixels"] == 10 and result["num_classes"] == 4


def test_class_predicted_but_absent_from_ground_truth_has_iou_zero_and_counts():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2, 1]), np.array([0, 1, 1]))
    result = cm.compute()
    assert result["iou"][2] == 0.0
    assert result["miou"] == pytest.approx((100 + 50 + 0) / 3)


def test_tensor_and_numpy_inputs_give_the_same_matrix():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(2, 17, 23)).astype(np.uint8)
    gt[:, :3] = 255
    pred = rng.integers(0, 5, size=(2, 17, 23)).astype(np.int64)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, gt)
    b.update(torch.from_numpy(pred), torch.from_numpy(gt).long())
    np.testing.assert_array_equal(a.matrix.numpy(), b.matrix.numpy())
    assert a.compute() == b.compute()


def test_accumulates_over_updates_like_one_big_update():
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 3, size=(5, 7)) for _ in range(3)]
    preds = [rng.integers(0, 3, size=(5, 7)) for _ in range(3)]
    one, many = ConfusionMatrix(3), ConfusionMatrix(3)
    one.update(np.stack(preds), np.stack(gts))
    for p, g in zip(preds, gts):
        many.update(p, g)
    np.testing.assert_array_equal(one.matrix.numpy(), many.matrix.numpy())


def test_out_of_range_prediction_counts_as_false_negative_only():
    cm = ConfusionMatrix(2)
    cm.update(np.array([255, 1, 0]), np.array([1, 1, 0]))
    result = cm.compute()
    # class 1: TP 1, FN 1 (the 255), FP 0 -> 0.5; class 0: TP 1 -> 1.0
    assert result["iou"] == pytest.approx([100.0, 50.0])
    assert result["pixel_acc"] == pytest.approx(100 * 2 / 3)


def test_merge_adds_counts_and_reduce_is_a_noop_without_distributed():
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(PRED[:2], GT[:2])
    b.update(PRED[2:], GT[2:])
    a.merge(b).reduce_()
    np.testing.assert_array_equal(a.matrix.numpy(), EXPECTED)


def test_empty_matrix_gives_nan_not_an_error():
    result = ConfusionMatrix(3).compute()
    assert math.isnan(result["miou"]) and result["num_pixels"] == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_format_table_lists_classes_miou_and_pixel_accuracy():
    cm = ConfusionMatrix(4, class_names=["background", "cat", "dog", "bird"])
    cm.update(PRED, GT)
    text = format_table(cm.compute())
    assert "cat" in text and "60.00" in text
    assert f"{sum(EXPECTED_IOU) / 3:.2f}" in text
    assert "pixel accuracy" in text and "70.00" in text
    assert "n/a" in text  # the absent class


def test_matrix_first_filled_under_inference_mode_can_be_merged_afterwards():
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    with torch.inference_mode():
        a.update(torch.from_numpy(PRED), torch.from_numpy(GT))
    b.update(PRED, GT)
    a.merge(b)  # in place on a's counts, outside inference mode
    np.testing.assert_array_equal(a.matrix.numpy(), 2 * EXPECTED)


def _reduce_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(4)
        rows = slice(0, 2) if rank == 0 else slice(2, 3)  # each rank sees part of the image
        cm.update(torch.from_numpy(PRED[rows]), torch.from_numpy(GT[rows]))
        queue.put((rank, cm.reduce_().matrix.numpy().tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reduce_sums_the_matrices_of_all_ranks(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    torch.multiprocessing.start_processes(_reduce_worker, args=(2, str(tmp_path / "init"), queue), nprocs=2,
                                          start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    for rank in (0, 1):
        np.testing.assert_array_equal(np.array(results[rank]), EXPECTED)


def test_json_writes_the_iou_of_an_absent_class_as_null():
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    data = json.loads(to_json(cm.compute()))  # strict JSON: NaN would not be valid
    assert data["iou"][3] is None
    assert data["iou"][:3] == pytest.approx(EXPECTED_IOU)


# --------------------------------------------------------------------------- image-level scores


def _scores_data(seed=0, n=40, k=4):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, k, generator=g) < torch.tensor([0.2, 0.4, 0.6, 0.5])).float()
    logits = 2.5 * (labels - 0.5) + 1.5 * torch.randn(n, k, generator=g)  # informative, with errors
    return logits, labels


def test_image_scores_f1_and_loss_match_sklearn_and_the_training_loss():
    from sklearn.metrics import f1_score

    from wsss.method.losses import classification_loss

    logits, labels = _scores_data()
    scores = ImageScores(4)
    scores.update(logits, labels)
    result = scores.compute()
    pred = (logits.sigmoid() > 0.5).numpy()
    assert result["macro_f1"] == pytest.approx(f1_score(labels.numpy(), pred, average="macro"), rel=1e-12)
    assert result["micro_f1"] == pytest.approx(f1_score(labels.numpy(), pred, average="micro"), rel=1e-12)
    np.testing.assert_allclose(result["per_class_f1"], f1_score(labels.numpy(), pred, average=None), rtol=1e-12)
    assert result["loss"] == pytest.approx(classification_loss(logits, labels).item(), rel=1e-6)
    np.testing.assert_allclose(result["label_frequency"], labels.double().mean(0).numpy(), rtol=1e-12)
    assert result["num_images"] == 40 and "prior_loss" not in result
    assert 0.5 < result["macro_f1"] < 0.95  # neither trivial end


def test_image_scores_accumulate_one_image_at_a_time_like_one_batch():
    logits, labels = _scores_data(1)
    whole, single = ImageScores(4), ImageScores(4)
    whole.update(logits, labels)
    for x, y in zip(logits, labels):  # [K] each, as validation feeds them
        single.update(x, y)
    a, b = whole.compute([0.3, 0.3, 0.3, 0.3]), single.compute([0.3, 0.3, 0.3, 0.3])
    assert a["per_class_f1"] == pytest.approx(b["per_class_f1"], rel=1e-12)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["prior_loss"] == pytest.approx(b["prior_loss"], rel=1e-12)


def test_image_scores_prior_loss_is_the_loss_of_constant_logits_at_the_given_frequencies():
    import torch.nn.functional as F

    logits, labels = _scores_data(2)
    scores = ImageScores(4)
    scores.update(logits, labels)
    f = torch.tensor([0.25, 0.5, 0.5, 0.4], dtype=torch.float64)
    direct = F.multilabel_soft_margin_loss(torch.logit(f).expand(len(labels), -1), labels.double()).item()
    assert scores.compute(f.tolist())["prior_loss"] == pytest.approx(direct, rel=1e-9)


def test_image_scores_of_a_class_never_present_nor_predicted_is_nan_and_left_out():
    scores = ImageScores(3)
    scores.update(torch.tensor([[4.0, -4.0, -4.0], [-4.0, -4.0, 3.0]]), torch.tensor([[1, 0, 0], [0, 0, 1]]))
    result = scores.compute()
    assert result["per_class_f1"][0] == 1.0 and math.isnan(result["per_class_f1"][1])
    assert result["macro_f1"] == 1.0
    empty = ImageScores(3).compute([0.5, 0.5, 0.5])
    assert empty["num_images"] == 0 and math.isnan(empty["loss"]) and math.isnan(empty["macro_f1"])
