import numpy as np

from heimdall.geodesy import from_local, haversine_m, to_local


def test_haversine_known_distance():
    # Torino -> Milano-Baggio WebSDR sites: about 113 km on the sphere
    d = haversine_m(45.044, 7.672, 45.478, 9.123)
    assert 110e3 < d < 125e3
    assert haversine_m(45.0, 7.0, 45.0, 7.0) == 0.0


def test_local_frame_round_trip_is_sub_millimetre():
    rng = np.random.default_rng(0)
    lat = 45 + rng.uniform(-1, 1, 1000)
    lon = 8 + rng.uniform(-1.5, 1.5, 1000)
    e, n = to_local(lat, lon, 45.0, 8.0)
    lat2, lon2 = from_local(e, n, 45.0, 8.0)
    assert haversine_m(lat, lon, lat2, lon2).max() < 1e-3


def test_local_distance_from_reference_is_haversine():
    e, n = to_local(np.array([45.5]), np.array([9.0]), 45.0, 8.0)
    assert abs(np.hypot(e, n)[0] - haversine_m(45.0, 8.0, 45.5, 9.0)) < 1e-6
