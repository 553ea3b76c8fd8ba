"""mCE and relative mCE against the formula of Hendrycks & Dietterich (ICLR 2019), written out by hand.

Per corruption ``c`` the corruption error is a ratio of sums over severities ``s``:

    CE_c = 100 * sum_s E_{s,c} / sum_s B_{s,c}
    relative CE_c = 100 * sum_s (E_{s,c} - E_clean) / sum_s (B_{s,c} - B_clean)

and (relative) mCE is the plain mean over corruptions. The errors below are deliberately not proportional to the
baseline's, so a mean of per-severity ratios gives other numbers than the ratio of sums (checked in the test).
"""

from __future__ import annotations

import pytest

from adaptkit.metrics import ALEXNET_CLEAN_ERR, ALEXNET_IMAGENET_C_ERR, corruption_errors, mce, relative_mce

# five severities, three corruptions; a method's errors (%) and a baseline's, far from proportional
ERR = {
    "gaussian_noise": [10.0, 20.0, 40.0, 70.0, 90.0],
    "fog": [5.0, 6.0, 8.0, 30.0, 60.0],
    "jpeg_compression": [50.0, 12.0, 14.0, 16.0, 20.0],
}
BASE = {
    "gaussian_noise": [40.0, 45.0, 50.0, 80.0, 95.0],
    "fog": [10.0, 40.0, 50.0, 55.0, 65.0],
    "jpeg_compression": [20.0, 30.0, 35.0, 60.0, 90.0],
}
CLEAN, BASE_CLEAN = 4.0, 8.0


def _ce(e: list[float], b: list[float]) -> float:
    return 100.0 * sum(e) / sum(b)


def _rel_ce(e: list[float], clean: float, b: list[float], b_clean: float) -> float:
    return 100.0 * sum(x - clean for x in e) / sum(y - b_clean for y in b)


def test_fixture_separates_ratio_of_sums_from_mean_of_ratios():
    for c in ERR:
        ratio_of_sums = _ce(ERR[c], BASE[c])
        mean_of_ratios = 100.0 * sum(x / y for x, y in zip(ERR[c], BASE[c])) / len(ERR[c])
        assert abs(ratio_of_sums - mean_of_ratios) > 1.0, c
        rel_sums = _rel_ce(ERR[c], CLEAN, BASE[c], BASE_CLEAN)
        rel_mean = 100.0 * sum((x - CLEAN) / (y - BASE_CLEAN) for x, y in zip(ERR[c], BASE[c])) / len(ERR[c])
        assert abs(rel_sums - rel_mean) > 1.0, c


def test_corruption_errors_are_ratio_of_sums_per_corruption():
    got = corruption_errors(ERR, BASE)
    assert set(got) == set(ERR)
    # hand-computed: gaussian 230/310, fog 109/220, jpeg 112/235
    assert got["gaussian_noise"] == pytest.approx(100 * 230 / 310)
    assert got["fog"] == pytest.approx(100 * 109 / 220)
    assert got["jpeg_compression"] == pytest.approx(100 * 112 / 235)
    for c in ERR:
        assert got[c] == pytest.approx(_ce(ERR[c], BASE[c]))


def test_mce_is_mean_over_corruptions_of_ratio_of_sums():
    expected = (100 * 230 / 310 + 100 * 109 / 220 + 100 * 112 / 235) / 3
    assert expected == pytest.approx(sum(_ce(ERR[c], BASE[c]) for c in ERR) / 3)
    assert mce(ERR, BASE) == pytest.approx(expected)


def test_relative_mce_is_mean_over_corruptions_of_ratio_of_summed_gaps():
    # sums of (E - 4) over 5 severities: 230 - 20, 109 - 20, 112 - 20; of (B - 8): 310 - 40, 220 - 40, 235 - 40
    expected = (100 * 210 / 270 + 100 * 89 / 180 + 100 * 92 / 195) / 3
    assert expected == pytest.approx(sum(_rel_ce(ERR[c], CLEAN, BASE[c], BASE_CLEAN) for c in ERR) / 3)
    assert relative_mce(ERR, CLEAN, BASE, BASE_CLEAN) == pytest.approx(expected)


def test_scalar_baseline_is_used_for_every_severity():
    # AlexNet's published errors are severity averages: sum_s B = n * avg for the n evaluated severities
    err = {"fog": [30.0, 35.0, 50.0], "snow": [20.0, 60.0, 70.0]}
    a_fog, a_snow = ALEXNET_IMAGENET_C_ERR["fog"], ALEXNET_IMAGENET_C_ERR["snow"]
    expected = (100 * 115 / (3 * a_fog) + 100 * 150 / (3 * a_snow)) / 2
    assert mce(err, ALEXNET_IMAGENET_C_ERR) == pytest.approx(expected)
    rel = (
        100 * (115 - 3 * 10) / (3 * (a_fog - ALEXNET_CLEAN_ERR))
        + 100 * (150 - 3 * 10) / (3 * (a_snow - ALEXNET_CLEAN_ERR))
    ) / 2
    assert relative_mce(err, 10.0, ALEXNET_IMAGENET_C_ERR, ALEXNET_CLEAN_ERR) == pytest.approx(rel)
