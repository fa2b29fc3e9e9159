import json
from pathlib import Path

import numpy as np
import pytest

from heimdall.data.dataset import SPLITS, Dataset, DatasetError, split_of
from heimdall.data.receivers import load_network
from heimdall.data.synth import SynthSpec, make_world, synthesize
from heimdall.data.states import ABSENT, receiver_states


def quiet(*_):
    pass


def test_default_network_and_colocated_sites():
    net = load_network()
    assert len(net) == 7 and net.num_sites == 6
    assert net.colocated_groups() == [("Aquila di Giaveno", "Coazze")]


def test_receiver_csv_errors_are_clear(tmp_path):
    bad = tmp_path / "rx.csv"
    bad.write_text("name,lat,lon\nA,1,2\n")
    with pytest.raises(ValueError, match="expected CSV columns"):
        load_network(bad)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    spec = dict(samples=700, seed=11, iq_length=128, shard_size=200)
    m1 = synthesize(SynthSpec(out=str(tmp_path / "w1"), **spec), workers=1, log=quiet)
    m2 = synthesize(SynthSpec(out=str(tmp_path / "w2"), **spec), workers=2, log=quiet)
    assert m1["shards"] == m2["shards"]  # paths, row counts and sha256 of every shard
    assert len(m1["shards"]) == 4 * 3
    m3 = synthesize(SynthSpec(out=str(tmp_path / "w3"), **{**spec, "seed": 12}), log=quiet)
    assert m3["shards"][0]["sha256"] != m1["shards"][0]["sha256"]


def test_rows_are_valid_and_split_by_hash(small_dataset):
    ds = Dataset.open(small_dataset)
    world = make_world(SynthSpec(out="", samples=1, seed=3, iq_length=256))
    seen = []
    for split in SPLITS:
        for cols in ds.iter_shards(split):
            assert (split_of(cols["sample_id"]) == split).all()
            assert (world.sites_hearing(cols["rx_state"]) >= 3).all()
            assert cols["iq"].dtype == np.int16 and cols["iq"].shape[1:] == (7, 2, 256)
            # absent receivers deliver zeros; online ones deliver IQ, and the stored state is the detector's
            online = cols["rx_state"] != ABSENT
            assert not cols["iq"][~online].any() and np.abs(cols["iq"][online]).max(axis=(-1, -2)).min() > 0
            assert np.array_equal(cols["rx_state"], receiver_states(cols["iq"], online))
            seen.append(cols["sample_id"])
    ids = np.sort(np.concatenate(seen))
    assert (ids == np.arange(600)).all()
    assert 0.7 < ds.count("train") / 600 < 0.9


def test_no_noise_or_fading_reused_between_samples(small_dataset):
    cols = next(Dataset.open(small_dataset).iter_shards("train"))
    iq = cols["iq"][:, 1]
    iq = iq[np.abs(iq).max(axis=(1, 2)) > 0]  # absent receivers deliver all zeros
    # the IQ rows of different samples must differ, and so must the fading-driven received powers
    assert len(iq) > 100 and len({row.tobytes() for row in iq}) == len(iq)
    assert len(np.unique(cols["rx_power_dbm"][:, 1])) == len(cols["rx_power_dbm"])


def test_colocated_note_printed_once(tmp_path):
    lines = []
    synthesize(SynthSpec(out=str(tmp_path / "d"), samples=50, iq_length=64), log=lines.append)
    notes = [line for line in lines if "share one site" in line]
    assert len(notes) == 1 and "Coazze" in notes[0]


def test_refuses_to_overwrite_without_flag(tmp_path):
    spec = SynthSpec(out=str(tmp_path / "d"), samples=20, iq_length=64)
    synthesize(spec, log=quiet)
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthesize(spec, log=quiet)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return Path(dst)


def test_missing_shard_is_named(small_dataset, tmp_path):
    root = _copy(small_dataset, tmp_path / "d")
    victim = json.loads((root / "manifest.json").read_text())["shards"][0]["path"]
    (root / victim).unlink()
    with pytest.raises(DatasetError, match=f"missing shard.*{victim}"):
        Dataset.open(str(root))


def test_corrupt_shard_is_named(small_dataset, tmp_path):
    root = _copy(small_dataset, tmp_path / "d")
    victim = json.loads((root / "manifest.json").read_text())["shards"][1]
    path = root / victim["path"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = Dataset.open(str(root))
    with pytest.raises(DatasetError, match=f"{victim['path']}.*unreadable"):
        list(ds.iter_shards(victim["split"]))


def test_incomplete_dataset_without_manifest_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        Dataset.open(str(tmp_path / "d"))


def test_wrong_iq_shape_is_reported(small_dataset, tmp_path):
    root = _copy(small_dataset, tmp_path / "d")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["iq_length"] = 512  # shards hold 256
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="column iq.*expected int16"):
        list(Dataset.open(str(root)).iter_shards("train"))
