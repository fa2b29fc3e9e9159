"""Three receiver states (absent, silent, heard): the one detector, old datasets refused by version,
and models made before receiver states (two-state `mask` input) still served and evaluated.

tests/fixtures/two-state/ holds a tiny model trained and exported by heimdall at commit 5cb780e,
before receiver states: its checkpoint (model.ckpt) and its ONNX export (model.onnx, input `mask`).
tests/fixtures/three-state-before-silent-sum/ holds a three-state checkpoint made at commit 4f47155,
before the head read the sum over silent receivers, and what it predicted then.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from heimdall.data.dataset import Dataset, DatasetError
from heimdall.data.states import ABSENT, DETECT_SNR_DB, HEARD, SILENT, detect
from helpers import ROOT, cli_in_process

TWO_STATE = ROOT / "tests" / "fixtures" / "two-state"
BEFORE_SILENT_SUM = ROOT / "tests" / "fixtures" / "three-state-before-silent-sum"


def fm_capture(rng, n: int, length: int, snr_db: float | None, noise_std: float = 30.0) -> np.ndarray:
    """n captures of complex noise, plus a unit-envelope FM tone at snr_db over the whole band."""
    t = np.arange(length) / 48_000.0
    noise = rng.standard_normal((n, 2, length)) * noise_std
    if snr_db is None:
        return np.rint(noise).astype(np.int16)
    amp = noise_std * np.sqrt(2 * 10 ** (snr_db / 10))
    phase = 2 * np.pi * 500.0 * t + 2 * np.pi * 2500 / 48_000.0 * np.cumsum(np.sin(2 * np.pi * 1000 * t))
    return np.rint(noise + amp * np.stack([np.cos(phase), np.sin(phase)])[None]).astype(np.int16)


@pytest.mark.parametrize("length", [128, 256, 1024])
def test_detector_false_alarm_and_detection_rates(length):
    """No false alarm on noise alone; heard 4 dB over the threshold, not 3 dB under it (the
    estimate reads an FM signal ~1 dB low: the median periodogram bin holds some of it)."""
    rng = np.random.default_rng(length)
    assert detect(fm_capture(rng, 4000, length, None)).mean() == 0
    assert detect(fm_capture(rng, 1000, length, DETECT_SNR_DB + 4)).mean() > 0.99
    assert detect(fm_capture(rng, 1000, length, DETECT_SNR_DB - 3)).mean() < 0.01


def test_a_schema_1_dataset_is_refused_naming_its_version(small_dataset, tmp_path, capsys):
    old = Path(shutil.copytree(small_dataset, tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(DatasetError, match="dataset schema version 1; this heimdall reads version 2"):
        Dataset.open(str(old))
    code, out = cli_in_process(capsys, "data", "info", str(old))
    assert code == 2 and "schema version 1" in out and len(out.strip().splitlines()) == 1


def test_a_receiver_that_records_noise_imports_as_silent(tmp_path, capsys):
    from heimdall.data.recordings import write_sigmf
    from helpers import EXAMPLES

    src = Path(shutil.copytree(EXAMPLES / "sigmf", tmp_path / "rec"))
    cap = src / "capture-000"
    meta = json.loads(next(cap.glob("*.sigmf-meta")).read_text())
    names = [r for r in ("Torino", "Genova", "Coazze", "Montanaro", "Milano-Baggio", "Passo del Giovi",
                         "Aquila di Giaveno") if not (cap / f"{r}.sigmf-data").exists()]
    noise = fm_capture(np.random.default_rng(0), 1, 256, None)[0]
    g = meta["global"]
    write_sigmf(cap, names[0], noise, (45.0, 7.5, 300.0), g["core:sample_rate"], meta["captures"][0]["core:frequency"],
                meta["captures"][0]["core:datetime"], (g["heimdall:transmitter"]["latitude"],
                                                       g["heimdall:transmitter"]["longitude"]))
    for f in (src / "capture-001").glob("*.sigmf-data"):  # every receiver online, none hears: nothing to locate
        noise = fm_capture(np.random.default_rng(1), 1, 256, None)[0]
        np.ascontiguousarray(noise.T, dtype="<i2").tofile(f)
    code, out = cli_in_process(capsys, "data", "import", str(src), "--out", str(tmp_path / "ds"))
    assert code == 0, out
    assert "skipped 1 capture(s) that no receiver hears" in out and "capture-001" in out
    ds = Dataset.open(str(tmp_path / "ds"))
    assert sum(ds.count(s) for s in ("train", "val", "test")) == ds.manifest["counts"]["total"] == 39
    receivers = [r["name"] for r in ds.manifest["receivers"]]
    rows = [c for s in ("train", "val", "test") for c in ds.iter_shards(s, columns=["capture", "rx_state", "iq"])]
    cols = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    i = list(cols["capture"]).index("capture-000")
    state = dict(zip(receivers, cols["rx_state"][i]))
    assert state[names[0]] == SILENT
    assert all(state[n] == ABSENT for n in names[1:])
    assert all(s == (HEARD if detect(cols["iq"][i, r]) else SILENT) for r, s in enumerate(cols["rx_state"][i])
               if s != ABSENT)
    code, out = cli_in_process(capsys, "predict", "--model", str(TWO_STATE / "model.onnx"), "--data", str(src),
                               "--out", str(tmp_path / "fixes.csv"))
    assert code == 0 and "39 captures" in out and "skipped 1 capture(s)" in out and "capture-001" in out, out


@pytest.fixture(scope="module")
def two_state_models():
    from heimdall.serving.inference import open_model

    return open_model(str(TWO_STATE / "model.ckpt")), open_model(str(TWO_STATE / "model.onnx"))


def test_models_from_before_receiver_states_are_served(two_state_models, small_dataset):
    """The old checkpoint restores as a two-state model; the old export takes `mask`. Both treat a
    silent receiver as absent, and agree with each other."""
    import onnxruntime as ort

    checkpoint, export = two_state_models
    assert export.predict.two_state and checkpoint.predict.model.net.receiver_states == 2
    cols = next(Dataset.open(small_dataset).iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    iq, rx_pos, rx_state = cols["iq"][:32], cols["rx_pos"][:32], cols["rx_state"][:32].copy()
    rx_state[:, 1] = np.where(rx_state[:, 1] == HEARD, SILENT, rx_state[:, 1])
    rx_state[:, 0] = HEARD
    as_absent = np.where(rx_state == SILENT, ABSENT, rx_state).astype(np.int8)
    direct = ort.InferenceSession(str(TWO_STATE / "model.onnx")).run(
        ["latitude"], {"iq": iq, "rx_pos": rx_pos, "mask": rx_state == HEARD})[0]
    for model in (checkpoint, export):
        got = model.predict(iq, rx_pos, rx_state)
        assert np.allclose(got["latitude"], model.predict(iq, rx_pos, as_absent)["latitude"], rtol=0, atol=1e-9)
        assert np.allclose(got["latitude"], direct, rtol=0, atol=1e-6)


def test_models_from_before_receiver_states_are_evaluated(two_state_models, small_dataset, tmp_path, capsys):
    from heimdall.evaluation.evaluate import evaluate_splits

    checkpoint, export = two_state_models
    dataset = Dataset.open(small_dataset)
    a = evaluate_splits(checkpoint, dataset, ["test"], log=lambda *_: None)["test"]["report"]
    b = evaluate_splits(export, dataset, ["test"], log=lambda *_: None)["test"]["report"]
    assert a.model.p68_m == pytest.approx(b.model.p68_m, rel=1e-4)
    assert a.model.p68_m < a.rows["centroid"].p68_m  # it still locates
    code, out = cli_in_process(capsys, "evaluate", "--model", str(TWO_STATE / "model.onnx"), "--data", small_dataset,
                               "--splits", "test", "--out", str(tmp_path / "report"))
    assert code == 0 and "P68 / ref" in out, out


def test_a_three_state_checkpoint_from_before_the_silent_sum_predicts_as_it_did(small_dataset):
    from heimdall.serving.inference import open_model

    expected = json.loads((BEFORE_SILENT_SUM / "predictions.json").read_text())
    model = open_model(str(BEFORE_SILENT_SUM / "model.ckpt"))
    net = model.predict.model.net
    assert net.receiver_states == 3 and not net.silent_sum
    n = expected["first_test_rows"]
    cols = next(Dataset.open(small_dataset).iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    assert (cols["rx_state"][:n] == SILENT).any()
    got = model.predict(cols["iq"][:n], cols["rx_pos"][:n], cols["rx_state"][:n])
    assert np.allclose(got["latitude"], expected["latitude"], rtol=0, atol=1e-6)  # 1e-6 degrees: 0.1 m
    assert np.allclose(got["longitude"], expected["longitude"], rtol=0, atol=1e-6)


def test_the_pipeline_makes_its_own_old_dataset_again_and_refuses_any_other(small_dataset, tmp_path):
    from heimdall.config import PipelineConfig, load_config
    from heimdall.data.dataset import SCHEMA_VERSION
    from launch.pipeline import ensure_dataset

    own = ["synth.samples=600", "synth.seed=3", "synth.iq_length=256", "synth.workers=1"]
    cases = (("synthetic", own, True), ("synthetic", ["synth.samples=900", *own[1:]], False), ("recordings", own, False))
    for k, (source, synth, replaced) in enumerate(cases):
        old = Path(shutil.copytree(small_dataset, tmp_path / str(k)))
        manifest = json.loads((old / "manifest.json").read_text())
        (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1, "source": source}))
        config = load_config(None, [f"data.uri={old}", *synth], schema=PipelineConfig)
        lines = []
        if replaced:
            ensure_dataset(config, lines.append)
            assert "schema version 1" in lines[0], lines
            assert json.loads((old / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
            assert Dataset.open(str(old)).count("train") == Dataset.open(small_dataset).count("train")
        else:  # a dataset this pipeline did not make is never replaced: refused, naming its version
            with pytest.raises(DatasetError, match="schema version 1"):
                ensure_dataset(config, lines.append)
            assert json.loads((old / "manifest.json").read_text())["schema_version"] == 1


def test_a_bool_mask_or_an_unknown_state_is_refused_by_both_predictors(two_state_models, small_dataset):
    from heimdall.data.states import check

    cols = next(Dataset.open(small_dataset).iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    for model in two_state_models:
        with pytest.raises(ValueError, match="boolean mask: pass 0"):
            model.predict(cols["iq"][:2], cols["rx_pos"][:2], cols["rx_state"][:2] == HEARD)
        with pytest.raises(ValueError, match=r"holds \[3\]"):
            model.predict(cols["iq"][:2], cols["rx_pos"][:2], np.full((2, 7), 3))
    assert check(np.array([[0, 1, 2]], np.int64)).dtype == np.int8
