"""DenseCRF: sharpening toward image edges, pool == inline, absent channels, missing pydensecrf2."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from wsss.config import EvalConfig
from wsss.engine.crf import CrfPool, crf_refine
from wsss.errors import WsssError

H, W = 24, 32


def two_colour_image() -> np.ndarray:
    """Left half dark red, right half light blue."""
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, : W // 2] = (150, 20, 20)
    image[:, W // 2:] = (40, 120, 230)
    return image


def blurry_probs() -> np.ndarray:
    """Class 0 slightly favoured everywhere (0.6 / 0.4), class 1 slightly more on the right."""
    probs = np.empty((2, H, W), dtype=np.float32)
    probs[0] = 0.6
    probs[0, :, W // 2:] = 0.45  # a weak hint on the right half
    probs[1] = 1 - probs[0]
    return probs


def test_crf_follows_the_colour_edge():
    refined = crf_refine(two_colour_image(), blurry_probs(), EvalConfig())
    label = refined.argmax(0)
    assert refined.shape == (2, H, W)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    assert (label[:, : W // 2] == 0).mean() > 0.95
    assert (label[:, W // 2:] == 1).mean() > 0.95
    # and it is sharper than the input: confidence went up on both sides
    assert refined[0, :, : W // 2].mean() > 0.8 and refined[1, :, W // 2:].mean() > 0.8


def test_crf_moves_a_misplaced_soft_boundary_onto_the_colour_edge():
    # class-1 probability ramps from left to right and crosses 0.5 four pixels right of the edge
    x = np.arange(W)
    p1 = np.clip(0.5 + (x - (W // 2 + 4)) * 0.03, 0.05, 0.95)
    probs = np.broadcast_to(np.stack([1 - p1, p1])[:, None, :], (2, H, W)).astype(np.float32)
    truth = np.broadcast_to(x >= W // 2, (H, W))
    assert (probs.argmax(0) != truth).mean() > 0.1  # before: a band of wrong pixels
    assert (crf_refine(two_colour_image(), probs).argmax(0) != truth).mean() < 0.02


def test_channels_that_are_zero_everywhere_stay_zero():
    probs = np.zeros((4, H, W), dtype=np.float32)
    probs[0], probs[2] = 0.6, 0.4
    probs[0, :, W // 2:], probs[2, :, W // 2:] = 0.45, 0.55
    refined = crf_refine(two_colour_image(), probs)
    assert refined[1].max() == 0 and refined[3].max() == 0
    assert set(np.unique(refined.argmax(0))) == {0, 2}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="probs must be"):
        crf_refine(two_colour_image(), np.ones((2, H + 1, W), dtype=np.float32))


def test_pool_gives_the_same_result_as_inline_and_keeps_order():
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(5):
        probs = rng.random((3, H, W)).astype(np.float32)
        jobs.append((f"img{i}", two_colour_image(), probs / probs.sum(0)))
    inline = {tag: crf_refine(image, probs) for tag, image, probs in jobs}
    with CrfPool(workers=2, max_in_flight=2) as pool:
        out = list(pool.imap(iter(jobs)))
    assert [tag for tag, _ in out] == [tag for tag, _, _ in jobs]
    for tag, refined in out:
        np.testing.assert_allclose(refined, inline[tag], atol=1e-6)
    with CrfPool(workers=0) as pool:  # inline mode
        assert [t for t, _ in pool.imap(jobs)] == [t for t, _, _ in jobs]


def test_pool_pulls_jobs_lazily():
    pulled = []

    def jobs():
        for i in range(6):
            pulled.append(i)
            yield i, two_colour_image(), blurry_probs()

    with CrfPool(workers=1, max_in_flight=2) as pool:
        it = pool.imap(jobs())
        next(it)
        assert len(pulled) == 2  # only max_in_flight jobs taken before the first result


def test_crf_without_pydensecrf2_says_how_to_install(monkeypatch):
    # a None entry in sys.modules makes "import pydensecrf" raise ImportError
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(WsssError, match=r"optional package 'pydensecrf2'.*pip install 'wsss\[crf\]'"):
        crf_refine(two_colour_image(), blurry_probs())
    with pytest.raises(WsssError, match="pydensecrf2"):
        CrfPool(workers=0)
