"""Calibration observers against hand-computed values and the behaviour each one promises."""

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvmq.calibration import (
    EntropyObserver,
    Histogram,
    MinMaxObserver,
    Observer,
    get_observer,
    list_observers,
)
from tvmq.calibration.entropy import kl_divergences
from tvmq.core.qmath import choose_qparams, dequantize, quantize, sqnr
from tvmq.errors import TvmqError

ALL = ["auto", "entropy", "minmax", "moving_average", "mse", "percentile"]


@pytest.fixture(scope="module")
def gaussian_with_outliers():
    rng = np.random.default_rng(0)
    inliers = rng.standard_normal(100_000).astype(np.float32)
    outliers = np.float32([60.0, -80.0, 100.0, -120.0, 90.0])
    return inliers, np.concatenate([inliers, outliers])


def _inlier_sqnr(obs: Observer, inliers: np.ndarray, symmetric: bool = False) -> float:
    s, z = obs.qparams("int8", symmetric)
    return sqnr(inliers, dequantize(quantize(inliers, s, z), s, z))


# -- registry -----------------------------------------------------------------------------------


def test_registry_and_get_observer():
    assert list_observers() == ALL
    a, b = get_observer("minmax"), get_observer("minmax")
    assert isinstance(a, MinMaxObserver) and a is not b
    assert get_observer("moving-average").averaging_constant == 0.01
    assert get_observer("percentile", percentile=99.9).percentile == 99.9
    assert isinstance(get_observer(EntropyObserver, bins=512), EntropyObserver)
    # an instance is a template: same configuration, fresh statistics
    template = get_observer("percentile", percentile=99.0)
    template.update(np.ones(4))
    copy = get_observer(template, label="conv1")
    assert copy is not template and copy.percentile == 99.0 and copy.num_batches == 0
    assert copy.label == "conv1" and template.num_batches == 1


def test_get_observer_errors():
    with pytest.raises(TvmqError, match="unknown observer 'kl'.*entropy, minmax"):
        get_observer("kl")
    with pytest.raises(TvmqError, match="no option 'percent'.*percentile"):
        get_observer("percentile", percent=99)
    with pytest.raises(TvmqError, match="instance"):
        get_observer(MinMaxObserver(), bins=3)
    with pytest.raises(TvmqError, match="not int"):
        get_observer(3)
    with pytest.raises(TvmqError, match="averaging_constant"):
        get_observer("moving_average", averaging_constant=0.0)
    with pytest.raises(TvmqError, match="percentile"):
        get_observer("percentile", percentile=20)


@pytest.mark.parametrize("name", ALL)
def test_common_contract(name):
    obs = get_observer(name, label="relu_3")
    with pytest.raises(TvmqError, match="no calibration data"):
        obs.range()
    with pytest.raises(TvmqError, match="relu_3.*NaN or inf"):
        obs.update(np.array([1.0, np.nan]))
    with pytest.raises(TvmqError, match="NaN or inf"):
        obs.update(np.array([np.inf], dtype=np.float16))
    obs.update(np.zeros((0, 3)))  # empty batches are ignored
    assert obs.num_batches == 0
    obs.update(np.linspace(-1.0, 2.0, 301, dtype=np.float32).reshape(7, 43))
    lo, hi = obs.range()
    assert -1.0 <= lo <= 0.0 <= hi <= 2.0
    s, z = obs.qparams()
    assert isinstance(s, float) and isinstance(z, int) and -128 <= z <= 127
    assert obs.qparams("uint8", symmetric=True)[1] == 128
    restored = pickle.loads(pickle.dumps(obs))  # observers pickle, e.g. to resume calibration
    assert restored.range() == (lo, hi)
    obs.reset()
    with pytest.raises(TvmqError):
        obs.range()
    obs.update(np.zeros(10))  # all-zero tensors give a tiny but valid scale
    assert obs.range() == (0.0, 0.0)
    assert obs.qparams()[0] > 0
    obs.update(np.arange(5, dtype=np.int64))  # integer data is accepted
    assert obs.range()[1] > 0


# -- minmax / moving average --------------------------------------------------------------------


def test_minmax_by_hand():
    obs = get_observer("minmax")
    obs.update(np.array([[1.0, -2.0], [3.0, 0.5]]))
    obs.update(np.array([2.5, -0.5]))
    assert obs.range() == (-2.0, 3.0)
    assert obs.qparams() == (float(np.float32(5.0 / 255)), -128 + 102)  # z = -128 - rint(-51.0)


def test_moving_average_by_hand():
    obs = get_observer("moving_average", averaging_constant=0.1)
    obs.update(np.array([-1.0, 2.0]))
    assert obs.range() == (-1.0, 2.0)
    obs.update(np.array([-3.0, 12.0]))
    lo, hi = obs.range()
    assert lo == pytest.approx(-1.0 + 0.1 * (-3.0 + 1.0))  # -1.2
    assert hi == pytest.approx(2.0 + 0.1 * (12.0 - 2.0))  # 3.0
    obs.update(np.array([0.0, 3.0]))
    assert obs.range() == pytest.approx((-1.2 + 0.1 * 1.2, 3.0))


# -- histogram ----------------------------------------------------------------------------------


def test_histogram_grows_exactly():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(2000) * scale for scale in (0.1, 1.0, 50.0, 3.0)]
    grown = Histogram(64)
    for p in parts:
        grown.add(p)
    assert grown.total == 8000 and len(grown.counts) <= 64
    edges = grown.edges()
    assert edges[0] <= min(p.min() for p in parts) and edges[-1] > max(p.max() for p in parts)
    # Doubling merges bins exactly: recount everything on the final grid.
    expected, _ = np.histogram(np.concatenate(parts), bins=edges)
    np.testing.assert_array_equal(grown.counts, expected)
    assert 0.0 in edges  # the grid is anchored at 0


def test_histogram_zeros_then_values():
    h = Histogram(16)
    h.add(np.zeros(5))
    h.add(np.array([0.0, 1.0, -1.0]))
    assert h.total == 8 and h.counts[h.edges()[:-1].tolist().index(0.0)] == 6


# -- percentile ---------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([90.0, 99.0, 99.9, 99.99]),
    st.integers(1, 4),
)
def test_percentile_matches_numpy(seed, p, n_batches):
    rng = np.random.default_rng(seed)
    batches = [rng.laplace(0.3, 1.0 + i, size=5000).astype(np.float32) for i in range(n_batches)]
    obs = get_observer("percentile", percentile=p)
    for b in batches:
        obs.update(b)
    data = np.concatenate(batches)
    lo, hi = obs.range()
    tol = obs.histogram.width * 1.001
    assert hi == pytest.approx(np.percentile(data, p), abs=tol)
    assert lo == pytest.approx(np.percentile(data, 100 - p), abs=tol)


def test_percentile_clips_outliers(gaussian_with_outliers):
    inliers, data = gaussian_with_outliers
    obs = get_observer("percentile")
    obs.update(data)
    lo, hi = obs.range()
    assert 3.0 < hi < 5.0 and -5.0 < lo < -3.0
    assert get_observer("percentile", percentile=100).update(data) is None


# -- entropy ------------------------------------------------------------------------------------


def _kl_loop(hist, nq, smoothing=1e-4):
    """Straightforward TensorRT-style loop over thresholds, one candidate at a time."""
    out = []
    for i in range(nq, len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        levels = np.floor(np.arange(i) * nq / i).astype(int)
        for g in range(nq):
            members = levels == g
            support = members & (p > 0)
            mass = hist[:i][members].sum()
            if support.any():
                q[support] = (mass if mass > 0 else smoothing) / support.sum()
        p /= p.sum()
        q /= hist[:i].sum()
        nz = p > 0
        out.append(np.sum(p[nz] * np.log(p[nz] / q[nz])) if np.all(q[nz] > 0) else np.inf)
    return np.array(out)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([4, 8, 16]))
def test_kl_divergences_match_loop(seed, nq):
    rng = np.random.default_rng(seed)
    hist = rng.poisson(rng.uniform(0, 30, size=40)).astype(np.float64)
    hist[rng.integers(0, 40, size=8)] = 0  # empty bins and gaps
    hist[0] += 1
    cand, kl = kl_divergences(hist, nq)
    np.testing.assert_array_equal(cand, np.arange(nq, 41))
    ref = _kl_loop(hist, nq)
    np.testing.assert_allclose(kl, np.maximum(ref, 0), rtol=1e-9, atol=1e-12)


def test_entropy_clips_outliers_and_beats_minmax(gaussian_with_outliers):
    inliers, data = gaussian_with_outliers
    ent, mm = get_observer("entropy"), get_observer("minmax")
    for batch in np.array_split(data, 4):
        ent.update(batch)
        mm.update(batch)
    lo, hi = ent.range()
    assert 2.5 < hi < 12.0 and -12.0 < lo < -2.5  # well inside the outliers (>= 60)
    for symmetric in (False, True):
        assert _inlier_sqnr(ent, inliers, symmetric) > _inlier_sqnr(mm, inliers, symmetric) + 10


def test_entropy_batches_track_growing_range(gaussian_with_outliers):
    inliers, _ = gaussian_with_outliers
    one, many = get_observer("entropy"), get_observer("entropy")
    one.update(inliers)
    # small-magnitude batches first: the histogram must widen later
    order = np.argsort(np.abs(inliers))
    for batch in np.array_split(inliers[order], 5):
        many.update(batch)
    assert many.histogram.total == one.histogram.total
    # KL thresholds move a little with histogram resolution (here 1024-2048 bins vs 2048)
    assert many.range()[1] == pytest.approx(one.range()[1], rel=0.12)
    assert 3.5 < many.range()[1] <= inliers.max()


def test_entropy_relu_uses_all_levels():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal(50_000), 0)
    obs = get_observer("entropy")
    obs.update(x)
    lo, hi = obs.range()
    assert lo == 0.0 and 2.0 < hi <= x.max()
    s, z = obs.qparams("uint8")
    assert z == 0
    # exact zeros are left out of the histogram: zero is exact and costs nothing
    assert obs.histogram.total == np.count_nonzero(x)


# -- mse ----------------------------------------------------------------------------------------


def _mse(obs_or_range, x, dtype="int8", symmetric=False):
    if isinstance(obs_or_range, Observer):
        s, z = obs_or_range.qparams(dtype, symmetric)
    else:
        s, z = choose_qparams(*obs_or_range, dtype, symmetric)
    return float(np.mean((dequantize(quantize(x, s, z, dtype), s, z) - x) ** 2))


def test_mse_beats_minmax_on_heavy_tails():
    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=100_000).astype(np.float32)
    obs = get_observer("mse")
    obs.update(x)
    lo, hi = obs.range()
    assert hi < 0.85 * x.max() and lo > 0.85 * x.min()  # clips the tails
    shrink = np.linspace(0.01, 1.0, 100)
    for dtype, symmetric in [("int8", False), ("int8", True), ("int4", True), ("uint4", False)]:
        minmax = _mse((x.min(), x.max()), x, dtype, symmetric)
        got = _mse(obs, x, dtype, symmetric)
        assert got < 0.85 * minmax
        # as good as brute force over real quantize/dequantize round trips
        brute = min(_mse((t * x.min(), t * x.max()), x, dtype, symmetric) for t in shrink)
        assert got <= 1.02 * brute


def test_mse_int4_gaussian_near_known_optimum():
    # Optimal symmetric 4-bit clipping of a unit Gaussian is about 2.5 sigma (Banner et al. 2019).
    x = np.random.default_rng(4).standard_normal(100_000).astype(np.float32)
    obs = get_observer("mse")
    obs.update(x)
    s, _ = obs.qparams("int4", symmetric=True)
    assert 2.0 < s * 7 < 3.2
    # and it searches per dtype: int8 keeps far more of the range
    assert obs.qparams("int8", symmetric=True)[0] * 127 > 3.3


def test_mse_keeps_isolated_outliers(gaussian_with_outliers):
    # Squared error weighs a few huge outliers more than the rounding clipping would save.
    _, data = gaussian_with_outliers
    obs = get_observer("mse")
    obs.update(data)
    assert obs.range()[1] > 50.0
    assert _mse(obs, data) <= _mse((data.min(), data.max()), data) * 1.01


def test_range_is_cached_until_update():
    obs = get_observer("mse")
    obs.update(np.linspace(-1, 1, 1000))
    first = obs.range()
    assert obs.range() is first
    obs.update(np.array([5.0]))
    assert obs.range() != first and math.isclose(obs.range()[1], 5.0, rel_tol=0.05)


def test_auto_holds_every_candidate_and_uses_the_chosen_one(rng):
    from tvmq.calibration.auto import CANDIDATES

    obs = get_observer("auto")
    x = rng.standard_normal(4096).astype(np.float32)
    x[7] = 200.0  # an outlier: the candidates disagree
    obs.update(x)
    ranges = {}
    for name in CANDIDATES:
        alone = get_observer(name)
        alone.update(x)
        obs.choose(name)
        assert obs.range() == alone.range(), name
        assert obs.qparams("uint8") == alone.qparams("uint8"), name
        ranges[name] = alone.range()
    assert ranges["minmax"][1] == 200.0 and ranges["entropy"][1] < 50  # they do differ
    with pytest.raises(TvmqError, match="not an auto candidate"):
        obs.choose("moving_average")
