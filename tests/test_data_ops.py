"""heimdall data import / info / validate on real files: the shipped example recordings, copies of
them broken on purpose, and datasets with a corrupt shard."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from heimdall.data.dataset import Dataset
from heimdall.data.states import ABSENT, DETECT_SNR_DB, HEARD, SILENT, detect
from helpers import EXAMPLES, cli, cli_in_process


@pytest.fixture
def recordings(tmp_path):
    """A private copy of the example recordings to break."""
    return Path(shutil.copytree(EXAMPLES, tmp_path / "rec"))


def test_import_of_the_example_recordings(tmp_path, capsys):
    code, out = cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", str(tmp_path / "ds"))
    assert code == 0, out
    assert "48 captures (8 legacy, 40 sigmf)" in out
    ds = Dataset.open(str(tmp_path / "ds"))
    assert sum(ds.count(s) for s in ("train", "val", "test")) == 48 and ds.iq_length == 256
    cols = {k: np.concatenate([c[k] for s in ("train", "val", "test") for c in ds.iter_shards(s, columns=[k])])
            for k in ("capture", "iq", "rx_state", "tx_lat", "tx_lon", "rx_pos")}
    index = {c: i for i, c in enumerate(cols["capture"])}
    assert len(index) == 48
    # A SigMF capture: every receiver file present is online with its exact samples, heard or silent by the
    # detector; a receiver without a file is absent.
    cap = EXAMPLES / "sigmf" / "capture-000"
    i = index["sigmf/capture-000"]
    names = [r["name"] for r in ds.manifest["receivers"]]
    for r, name in enumerate(names):
        data = cap / f"{name}.sigmf-data"
        assert (cols["rx_state"][i, r] != ABSENT) == data.exists()
        if data.exists():
            assert cols["rx_state"][i, r] == (HEARD if detect(cols["iq"][i, r]) else SILENT)
            assert np.array_equal(cols["iq"][i, r], np.fromfile(data, "<i2").reshape(-1, 2).T)
            meta = json.loads((cap / f"{name}.sigmf-meta").read_text())["global"]
            assert cols["rx_pos"][i, r, 0] == meta["core:geolocation"]["coordinates"][1]
            assert (cols["tx_lat"][i], cols["tx_lon"][i]) == (meta["heimdall:transmitter"]["latitude"],
                                                              meta["heimdall:transmitter"]["longitude"])
    # A legacy complex64 session (full scale 1.0) comes back as int16 counts within rounding.
    session = "legacy/session-041"
    iq = np.load(EXAMPLES / f"{session}_iq.npy")
    j = index[session]
    assert np.abs(cols["iq"][j, :, 0] - iq.real * 32767).max() <= 1.0
    assert list(np.load(EXAMPLES / f"{session}_label.npy")) == [cols["tx_lat"][j], cols["tx_lon"][j]]
    # The baseline calibration is measured from the data: the baseline must beat the centroid.
    from heimdall.evaluation.baseline import Calibration, locate
    from heimdall.geodesy import haversine_m

    cal = Calibration.from_manifest(ds.manifest)
    lat, lon = locate(cols["iq"], cols["rx_pos"], cols["rx_state"] == HEARD, cal)
    baseline = np.median(haversine_m(lat, lon, cols["tx_lat"], cols["tx_lon"]))
    centroid = np.median(haversine_m(cal.ref_lat, cal.ref_lon, cols["tx_lat"], cols["tx_lon"]))
    assert baseline < 0.5 * centroid, (baseline, centroid)


def test_import_is_stable_and_refuses_to_overwrite(tmp_path, capsys):
    for out in ("a", "b"):
        assert cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", str(tmp_path / out))[0] == 0
    a, b = (Dataset.open(str(tmp_path / o)) for o in "ab")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    code, out = cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", str(tmp_path / "a"))
    assert code == 2 and "already holds a dataset" in out


def _sidecar(path: Path, **changes):
    meta = json.loads(path.read_text())
    meta["global"].update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("breakage, message", [
    ("rate", "sample rate 24000 Hz, but"),
    ("receiver", "unknown receiver 'Nowhere'"),
    ("length", "IQ samples, but"),
    ("no_tx", "no transmitter position"),
    ("missing_data", "its IQ file Genova.sigmf-data is missing"),
    ("bad_json", "unreadable JSON"),
    ("nan", "IQ has NaN or infinite values"),
])
def test_bad_recordings_name_the_file_and_write_nothing(recordings, tmp_path, capsys, breakage, message):
    cap = recordings / "sigmf" / "capture-007"
    named = cap / "Genova.sigmf-meta"
    if breakage == "rate":
        _sidecar(named, **{"core:sample_rate": 24000.0})
    elif breakage == "receiver":
        _sidecar(named, **{"heimdall:receiver": "Nowhere"})
    elif breakage == "length":
        data = cap / "Genova.sigmf-data"
        data.write_bytes(data.read_bytes()[:-400])
        named = data
    elif breakage == "no_tx":
        for meta in cap.glob("*.sigmf-meta"):
            m = json.loads(meta.read_text())
            del m["global"]["heimdall:transmitter"]
            meta.write_text(json.dumps(m))
        named = cap
    elif breakage == "missing_data":
        (cap / "Genova.sigmf-data").unlink()
    elif breakage == "bad_json":
        named.write_text("{not json")
    elif breakage == "nan":  # a float legacy session with one NaN: found only while writing shards
        session = sorted((recordings / "legacy").glob("*_iq.npy"))[1]
        iq = np.load(session)
        assert np.iscomplexobj(iq)
        iq[2, 17] = np.nan
        np.save(session, iq)
        named = session
    out_dir = tmp_path / "out"
    code, out = cli_in_process(capsys, "data", "import", str(recordings), "--out", str(out_dir))
    assert code == 2, out
    assert message in out and str(named) in out, out
    assert not out_dir.exists() or not any(p.is_file() for p in out_dir.rglob("*")), list(out_dir.rglob("*"))


def test_legacy_sessions_without_metadata_need_a_sample_rate(recordings, tmp_path, capsys):
    legacy = recordings / "legacy"
    for meta in legacy.glob("*_metadata.json"):
        meta.unlink()
    code, out = cli_in_process(capsys, "data", "import", str(legacy), "--out", str(tmp_path / "x"))
    assert code == 2 and "sample rate unknown" in out and "_iq.npy" in out
    code, out = cli_in_process(capsys, "data", "import", str(legacy), "--out", str(tmp_path / "x"),
                               "--sample-rate", "48000")
    assert code == 0, out
    assert Dataset.open(str(tmp_path / "x")).manifest["import"]["layouts"] == {"legacy": 8}


def test_iq_length_crops_longer_recordings(recordings, tmp_path, capsys):
    data = recordings / "sigmf" / "capture-003" / "Torino.sigmf-data"
    data.write_bytes(data.read_bytes() + b"\x01\x00" * 64)  # 32 extra I/Q pairs
    code, out = cli_in_process(capsys, "data", "import", str(recordings), "--out", str(tmp_path / "x"))
    assert code == 2 and "288 IQ samples, but" in out
    code, out = cli_in_process(capsys, "data", "import", str(recordings), "--out", str(tmp_path / "x"),
                               "--iq-length", "256")
    assert code == 0, out


def test_info_reports_counts_receivers_activity_and_snr(small_dataset, capsys):
    code, out = cli_in_process(capsys, "data", "info", small_dataset, "--json")
    assert code == 0
    d = json.loads(out)
    ds = Dataset.open(small_dataset)
    assert d["counts"] == {s: ds.count(s) for s in ("train", "val", "test")} and d["rows_read"] == 600
    states = np.concatenate([c["rx_state"] for s in ("train", "val", "test")
                             for c in ds.iter_shards(s, columns=["rx_state"])])
    assert [r["heard"] for r in d["receivers"]] == pytest.approx((states == HEARD).mean(0).tolist())
    assert [r["silent"] for r in d["receivers"]] == pytest.approx((states == SILENT).mean(0).tolist())
    assert sum(d["heard_receivers_per_capture"].values()) == 600 and d["detector"]["threshold_db"] == DETECT_SNR_DB
    # SNR measured from the IQ follows the SNR the generator recorded.
    assert abs(d["snr_db_measured"]["p50"] - d["snr_db_recorded"]["p50"]) < 10
    assert d["manifest_checks"] == {"missing_shards": [], "counts_match": True}
    code, out = cli_in_process(capsys, "data", "info", small_dataset)
    assert code == 0 and "receivers that hear, per capture" in out and "Milano-Baggio" in out
    assert "shard files present, counts match" in out


def test_validate_names_corrupt_and_missing_shards(small_dataset, tmp_path, capsys):
    ds_dir = Path(shutil.copytree(small_dataset, tmp_path / "ds"))
    assert cli_in_process(capsys, "data", "validate", str(ds_dir))[0] == 0
    shards = sorted(p.relative_to(ds_dir).as_posix() for p in ds_dir.rglob("*.parquet"))
    flipped, truncated, missing = shards[0], shards[1], shards[2]
    data = bytearray((ds_dir / flipped).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside the IQ: still readable, wrong content
    (ds_dir / flipped).write_bytes(bytes(data))
    (ds_dir / truncated).write_bytes((ds_dir / truncated).read_bytes()[:5000])
    (ds_dir / missing).unlink()
    code, out = cli_in_process(capsys, "data", "validate", str(ds_dir))
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert any(flipped in p and "sha256" in p for p in problems), out
    assert any(truncated in p and "unreadable" in p for p in problems), out
    assert any(missing in p and "missing" in p for p in problems), out
    assert all(s in out for s in shards[3:]) and f"{shards[3]}: ok" in out


def test_float_sigmf_recordings_import_as_int16_counts(recordings, tmp_path, capsys):
    cap = recordings / "sigmf" / "capture-005"
    ints = {}
    for meta in cap.glob("*.sigmf-meta"):
        data = meta.with_name(meta.name.replace(".sigmf-meta", ".sigmf-data"))
        ints[meta.name] = np.fromfile(data, "<i2")
        (ints[meta.name] / 32767.0).astype("<f4").tofile(data)
        _sidecar(meta, **{"core:datatype": "cf32_le"})
    code, out = cli_in_process(capsys, "data", "import", str(recordings), "--out", str(tmp_path / "x"))
    assert code == 0, out
    ds = Dataset.open(str(tmp_path / "x"))
    names = [r["name"] for r in ds.manifest["receivers"]]
    for split in ("train", "val", "test"):
        for cols in ds.iter_shards(split, columns=["capture", "iq"]):
            for i in np.flatnonzero(cols["capture"] == "sigmf/capture-005"):
                for name, raw in ints.items():
                    got = cols["iq"][i, names.index(name.replace(".sigmf-meta", ""))]
                    assert np.array_equal(got, raw.reshape(-1, 2).T)
                return
    raise AssertionError("capture-005 not imported")


# ---- --overwrite: the old dataset stays readable until the new one is complete -----------------------
def read_everything(uri: str) -> dict:
    """Every row of every split, checked against the manifest's shard hashes."""
    ds = Dataset.open(uri)
    return {"manifest": ds.manifest_sha256,
            **{split: np.concatenate([c["sample_id"] for c in ds.iter_shards(split)]) for split in ("train", "val", "test")}}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_synth_overwrite_killed_part_way_keeps_the_old_dataset(where, tmp_path, request):
    if where == "s3":
        import boto3

        request.getfixturevalue("s3_server")
        boto3.client("s3").create_bucket(Bucket="overwrite")
        uri = "s3://overwrite/ds"
    else:
        uri = str(tmp_path / "ds")
    synth = ["data", "synth", "--out", uri, "--samples", "600", "--iq-length", "128", "--shard-size", "100"]
    assert cli(*synth, "--seed", "1", timeout=300).returncode == 0
    before = read_everything(uri)
    # Killed (SIGKILL) after 3 of the replacement's 6 chunks are written, before its manifest.
    fault = {"HEIMDALL_FAULT": "dataset_write@3", "HEIMDALL_FAULT_MARKER": str(tmp_path / "fired")}
    killed = cli(*synth, "--seed", "2", "--overwrite", env=fault, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    after = read_everything(uri)
    assert after["manifest"] == before["manifest"] and all(np.array_equal(after[k], before[k]) for k in before)
    # The same command again completes the replacement and leaves only the new dataset's files.
    assert cli(*synth, "--seed", "2", "--overwrite", env=fault, timeout=300).returncode == 0
    new = Dataset.open(uri)
    assert new.manifest_sha256 != before["manifest"] and new.manifest["world"]["seed"] == 2
    assert read_everything(uri)["train"].size == new.count("train")
    fs, root = new.fs, new.root
    from pyarrow.fs import FileSelector, FileType

    files = {i.path.removeprefix(root.rstrip("/") + "/") for i in fs.get_file_info(FileSelector(root, recursive=True))
             if i.type == FileType.File}
    assert files == {"manifest.json", *(s.path for s in new.shards)}, sorted(files)


def test_import_overwrite_failing_part_way_keeps_the_old_dataset(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "ds")
    assert cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", out, "--shard-size", "2")[0] == 0
    before = read_everything(out)
    monkeypatch.setenv("HEIMDALL_FAULT", "dataset_write=enospc@2")  # a full disk at the 2nd shard
    monkeypatch.setenv("HEIMDALL_FAULT_MARKER", str(tmp_path / "fired"))
    code, said = cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", out,
                                "--shard-size", "3", "--overwrite")
    assert code != 0 and "No space left" in said, said
    after = read_everything(out)
    assert after["manifest"] == before["manifest"] and all(np.array_equal(after[k], before[k]) for k in before)
    assert not [p for p in Path(out).iterdir() if p.name.startswith("gen-")]  # the partial write cleaned up
    assert cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", out,
                          "--shard-size", "3", "--overwrite")[0] == 0
    assert Dataset.open(out).manifest["shard_size"] == 3
