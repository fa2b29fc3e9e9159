import numpy as np

from heimdall.evaluation.metrics import IDEAL_COVERAGE, summarize


def test_percentiles_and_coverage_of_a_calibrated_gaussian():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((200_000, 2))
    errors = np.hypot(*(z * 1000.0).T)
    m = summarize(errors, whitened=z, nll=np.ones(len(z)), split="val")
    # Rayleigh(1000 m): median 1177 m, P95 2448 m
    assert abs(m["val_p50_m"] - 1177.4) < 10 and abs(m["val_p95_m"] - 2447.7) < 20
    assert abs(m["val_cov1"] - IDEAL_COVERAGE["cov1"]) < 0.005
    assert abs(m["val_cov2"] - IDEAL_COVERAGE["cov2"]) < 0.005
    assert set(m) == {"val_p50_m", "val_p68_m", "val_p95_m", "val_cov1", "val_cov2", "val_nll"}


def test_overconfident_predictions_show_low_coverage():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((10_000, 2)) * 3  # errors 3x the claimed sigma
    m = summarize(np.hypot(*z.T), whitened=z)
    assert m["cov1"] < 0.1 and m["cov2"] < 0.4
