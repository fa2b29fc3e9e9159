"""heimdall evaluate / predict on a real trained model: its checkpoint, its exported ONNX file and
its registry version (real MLflow server) must give the same numbers."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import EXAMPLES, OPS_MODEL, cli_in_process


@pytest.fixture(scope="module")
def onnx_file(exported_model):
    return str(Path(exported_model.out_dir) / "model.onnx")


def evaluate(capsys, model, out, *extra):
    code, text = cli_in_process(capsys, "evaluate", "--model", model, "--splits", "val,test", "--out", str(out), *extra)
    assert code == 0, text
    return json.loads((Path(out) / "metrics.json").read_text())["splits"], text


@pytest.mark.timeout(600)
def test_checkpoint_and_its_onnx_export_give_the_same_numbers(trained_checkpoint, onnx_file, tmp_path, capsys):
    ckpt, text = evaluate(capsys, trained_checkpoint, tmp_path / "ckpt")
    onnx, _ = evaluate(capsys, onnx_file, tmp_path / "onnx")
    assert set(ckpt) == set(onnx) == {"val", "test"}
    for split in ckpt:
        a, b = ckpt[split], onnx[split]
        assert a["count"] == b["count"] > 0
        groups = [(a["rows"], b["rows"])] + [(a["by_active_receivers"][k]["rows"], b["by_active_receivers"][k]["rows"])
                                             for k in a["by_active_receivers"]]
        assert set(a["by_active_receivers"]) == set(b["by_active_receivers"])
        for ra, rb in groups:
            for key in ("p50_m", "p68_m", "p95_m"):  # the export's parity tolerance: 1 m
                assert abs(ra["model"][key] - rb["model"][key]) < 1.0, (split, key)
            assert abs(ra["model"]["nll"] - rb["model"]["nll"]) < 1e-3
            for key in ("cov1", "cov2"):  # one sample on an ellipse's edge may flip
                assert abs(ra["model"][key] - rb["model"][key]) <= 1.0 / a["count"] + 1e-12
            assert ra["physics baseline"] == rb["physics baseline"] and ra["centroid"] == rb["centroid"]
        # It learned: the evaluation is measuring a model, not noise.
        assert a["rows"]["model"]["p68_m"] < 0.5 * a["rows"]["centroid"]["p68_m"]
        counts = {int(k): v["count"] for k, v in a["by_active_receivers"].items()}
        assert sum(counts.values()) == a["count"] and min(counts) >= 1
    assert "receivers heard" in text and "physics baseline" in text and "P68 / ref" in text
    assert all("reference" in ckpt[split]["rows"] for split in ckpt)  # synthetic data: the world is known
    report = (tmp_path / "ckpt" / "report.md").read_text()
    assert "## test split" in report and "| physics baseline |" in report and "by number of receivers that hear" in report
    for split in ("val", "test"):
        for plot in ("error_cdf", "map"):
            assert (tmp_path / "ckpt" / "plots" / f"{split}_{plot}.png").stat().st_size > 10_000
            assert f"plots/{split}_{plot}.png" in report


@pytest.mark.timeout(600)
def test_registry_reference_html_report_and_mlflow_logging(exported_model, onnx_file, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    ref = f"models:/{OPS_MODEL}/{exported_model.version}"
    metrics, text = evaluate(capsys, ref, tmp_path / "reg", "--format", "html", "--mlflow", f"mlflow.tracking_uri={mlflow_server}",
                             "mlflow.experiment=evaluations")
    onnx, _ = evaluate(capsys, onnx_file, tmp_path / "onnx")
    assert metrics["test"]["rows"]["model"] == onnx["test"]["rows"]["model"]  # the same bytes: identical
    html = (tmp_path / "reg" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and 'src="plots/test_map.png"' in html
    run_id = text.split("MLflow run: ")[1].split()[0]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "evaluations"  # mlflow.experiment honoured
    assert run.data.tags["heimdall.producer"] == "onnx"
    assert run.data.metrics["test_p68_m"] == pytest.approx(metrics["test"]["rows"]["model"]["p68_m"])
    assert run.data.metrics["test_baseline_p68_m"] == pytest.approx(metrics["test"]["rows"]["physics baseline"]["p68_m"])
    assert run.data.params["model_version"] == str(exported_model.version)
    logged = {f.path for f in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/metrics.json", "evaluation/plots"} <= logged


def test_evaluate_refuses_data_the_model_cannot_read(onnx_file, small_dataset, tmp_path, capsys):
    from heimdall.data.synth import SynthSpec, synthesize

    other = tmp_path / "long"
    synthesize(SynthSpec(out=str(other), samples=40, seed=1, iq_length=512), log=lambda *_: None)
    code, out = cli_in_process(capsys, "evaluate", "--model", onnx_file, "--data", str(other),
                               "--out", str(tmp_path / "r"))
    assert code == 2 and "IQ length 512, but" in out and not (tmp_path / "r").exists()
    code, out = cli_in_process(capsys, "evaluate", "--model", str(tmp_path / "nothing.ckpt"), "--data", small_dataset)
    assert code == 2 and "no checkpoint there" in out


@pytest.mark.timeout(600)
def test_predict_recordings_to_csv_json_geojson(trained_checkpoint, onnx_file, train_dataset, tmp_path, capsys):
    outputs = {}
    for model, name in ((onnx_file, "fixes.csv"), (onnx_file, "fixes.json"), (onnx_file, "fixes.geojson"),
                        (trained_checkpoint, "ckpt.csv")):
        code, text = cli_in_process(capsys, "predict", "--model", model, "--data", str(EXAMPLES),
                                    "--out", str(tmp_path / name))
        assert code == 0, text
        assert "48 captures" in text and "median error" in text
        outputs[name] = tmp_path / name
    rows = list(csv.DictReader(open(outputs["fixes.csv"])))
    assert len(rows) == 48 and {r["capture"] for r in rows} >= {"sigmf/capture-000", "legacy/session-040"}
    for r in rows:
        lat, lon, err = float(r["latitude"]), float(r["longitude"]), float(r["error_m"])
        assert 43 < lat < 47 and 6 < lon < 11 and np.isfinite(err)
        assert float(r["semi_major_m"]) >= float(r["semi_minor_m"]) > 0 and 0 <= float(r["orientation_deg"]) < 180
    truth = {r["capture"]: (float(r["true_latitude"]), float(r["true_longitude"])) for r in rows}
    meta = json.loads((EXAMPLES / "sigmf" / "capture-000" / "Genova.sigmf-meta").read_text())["global"]
    assert truth["sigmf/capture-000"] == (meta["heimdall:transmitter"]["latitude"], meta["heimdall:transmitter"]["longitude"])
    # The example recordings come from another world seed than the training data: the model
    # still has to locate them far better than the area is wide (~200 km).
    assert np.median([float(r["error_m"]) for r in rows]) < 40_000
    as_json = json.loads(outputs["fixes.json"].read_text())["predictions"]
    assert [p["latitude"] for p in as_json] == [float(r["latitude"]) for r in rows]
    ckpt = list(csv.DictReader(open(outputs["ckpt.csv"])))
    from heimdall.geodesy import haversine_m

    gap = [haversine_m(float(a["latitude"]), float(a["longitude"]), float(b["latitude"]), float(b["longitude"]))
           for a, b in zip(rows, ckpt)]
    assert max(gap) < 1.0  # checkpoint and ONNX agree to the export's parity tolerance
    # A dataset is an input too: every capture of every split, with its error.
    code, text = cli_in_process(capsys, "predict", "--model", onnx_file, "--input", train_dataset,
                                "--output", str(tmp_path / "ds.csv"))
    assert "--input is deprecated, use --data" in text and "--output is deprecated, use --out" in text
    assert code == 0, text
    from heimdall.data.dataset import Dataset

    ds_rows = list(csv.DictReader(open(tmp_path / "ds.csv")))
    assert len(ds_rows) == sum(Dataset.open(train_dataset).count(s) for s in ("train", "val", "test"))
    assert all(np.isfinite(float(r["error_m"])) for r in ds_rows)
    geo = json.loads(outputs["fixes.geojson"].read_text())
    points = [f for f in geo["features"] if f["geometry"]["type"] == "Point"]
    rings = [f["geometry"]["coordinates"][0] for f in geo["features"] if f["geometry"]["type"] == "Polygon"]
    assert geo["type"] == "FeatureCollection" and len(points) == len(rings) == 48
    assert all(ring[0] == ring[-1] and len(ring) > 10 for ring in rings)
    from heimdall.geodesy import to_local

    # Each ellipse ring surrounds its point at the predicted semi-axes' distances.
    p, ring = points[0], np.array(rings[0])
    e, n = to_local(ring[:, 1], ring[:, 0], p["geometry"]["coordinates"][1], p["geometry"]["coordinates"][0])
    assert np.hypot(e, n).max() == pytest.approx(p["properties"]["semi_major_m"], rel=1e-3)
    assert np.hypot(e, n).min() == pytest.approx(p["properties"]["semi_minor_m"], rel=1e-3)


def test_predict_refuses_unknown_receivers_and_wrong_rates(onnx_file, tmp_path, capsys):
    import shutil

    rec = Path(shutil.copytree(EXAMPLES / "sigmf" / "capture-002", tmp_path / "capture-002"))
    meta = rec / "Genova.sigmf-meta"
    m = json.loads(meta.read_text())
    m["global"]["heimdall:receiver"] = "Pinerolo"
    meta.write_text(json.dumps(m))
    code, out = cli_in_process(capsys, "predict", "--model", onnx_file, "--data", str(rec),
                               "--out", str(tmp_path / "p.csv"))
    assert code == 2 and "unknown receiver 'Pinerolo'" in out and str(meta) in out
    m["global"]["heimdall:receiver"], m["global"]["core:sample_rate"] = "Genova", 96000.0
    meta.write_text(json.dumps(m))
    code, out = cli_in_process(capsys, "predict", "--model", onnx_file, "--data", str(rec),
                               "--out", str(tmp_path / "p.csv"))
    assert code == 2 and "sample rate 96000 Hz" in out and str(meta) in out
    assert not (tmp_path / "p.csv").exists()
    # Without the truth, a capture is still located (no error column).
    for f in rec.glob("*.sigmf-meta"):
        m = json.loads(f.read_text())
        m["global"].pop("heimdall:transmitter")
        m["global"]["core:sample_rate"] = 48000.0
        m["global"]["heimdall:receiver"] = f.name[: -len(".sigmf-meta")]
        f.write_text(json.dumps(m))
    code, out = cli_in_process(capsys, "predict", "--model", onnx_file, "--data", str(rec),
                               "--out", str(tmp_path / "p.json"))
    assert code == 0, out
    (row,) = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert row["capture"] == "capture-002" and "error_m" not in row


def test_evaluate_imported_recordings_beside_the_measured_baseline(onnx_file, tmp_path, capsys):
    assert cli_in_process(capsys, "data", "import", str(EXAMPLES), "--out", str(tmp_path / "ds"))[0] == 0
    splits, text = evaluate(capsys, onnx_file, tmp_path / "r", "--data", str(tmp_path / "ds"))
    for split, e in splits.items():
        rows = e["rows"]
        assert set(rows) == {"model", "physics baseline", "centroid"}
        # The example world differs from the training world (another seed), but the model still
        # locates far better than the centroid, and so does the baseline with its measured calibration.
        assert rows["model"]["p50_m"] < 0.6 * rows["centroid"]["p50_m"], (split, rows)
        assert rows["physics baseline"]["p50_m"] < rows["centroid"]["p50_m"], (split, rows)


def test_rows_that_no_receiver_hears_are_named():
    from heimdall.training.batch import require_heard

    rx_state = np.array([[2, 0], [1, 0], [0, 1]], np.int8)  # silent receivers alone locate nothing
    with pytest.raises(ValueError, match=r"^data \(test\): sample 11 \(and 1 more\): no receiver hears the transmitter"):
        require_heard(rx_state, np.array([10, 11, 12]), "data (test): sample")
    require_heard(rx_state[:1], np.array([10]), "data (test): sample")
