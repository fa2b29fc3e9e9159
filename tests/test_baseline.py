import numpy as np

from heimdall.evaluation.baseline import Calibration, locate, measured_rssi_dbm
from heimdall.data.states import HEARD
from heimdall.geodesy import haversine_m
from heimdall.data.synth import SynthSpec, build_manifest, generate_chunk, make_world

NOISELESS = dict(terrain_std_db=0, shadowing_std_db=0, fading="none", noise_figure_db=-10, absent_prob=0,
                 full_scale_dbm=-40, margin_km=0)


def test_physics_baseline_recovers_noiseless_positions():
    spec = SynthSpec(out="", samples=400, world=NOISELESS)
    world = make_world(spec)
    cols = generate_chunk(world, 0, 0, 0, 400)
    cal = Calibration.from_manifest(build_manifest(spec, world, []))
    rssi = measured_rssi_dbm(cols["iq"], cal)
    heard = cols["rx_state"] == HEARD
    assert np.abs(rssi - cols["rx_power_dbm"])[heard].max() < 0.2  # RSSI read from the IQ itself
    lat, lon = locate(cols["iq"], cols["rx_pos"], heard, cal)
    err = haversine_m(lat, lon, cols["tx_lat"], cols["tx_lon"])
    assert np.median(err) < 30 and np.percentile(err, 95) < 100, np.percentile(err, [50, 95, 100])


def test_physics_baseline_beats_centroid_on_default_world():
    spec = SynthSpec(out="", samples=400)
    world = make_world(spec)
    cols = generate_chunk(world, 0, 0, 0, 400)
    cal = Calibration.from_manifest(build_manifest(spec, world, []))
    lat, lon = locate(cols["iq"], cols["rx_pos"], cols["rx_state"] == HEARD, cal)
    err = haversine_m(lat, lon, cols["tx_lat"], cols["tx_lon"])
    centroid = haversine_m(cal.ref_lat, cal.ref_lon, cols["tx_lat"], cols["tx_lon"])
    assert np.median(err) < np.median(centroid)
