"""`heimdall export`: the serving graph, ONNX Runtime parity, the S3 serving copy and the MLflow
registry, against a real moto S3 server and a real `mlflow server` (SQL backend)."""
import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from heimdall.config import ExportConfig, load_config
from heimdall.data.states import ABSENT, HEARD, SILENT
from helpers import HEIMDALL_BIN, cli, free_port

MODELS_BUCKET = "models"


# ---- the serving graph's own arithmetic (no services) ---------------------------------------------
def test_serving_geodesy_matches_numpy_float64():
    from heimdall import geodesy
    from heimdall.serving import graph as serving

    rng = np.random.default_rng(0)
    ref = (45.1, 7.6)
    lat = np.concatenate([[ref[0]], ref[0] + rng.uniform(-3, 3, 500)])
    lon = np.concatenate([[ref[1]], ref[1] + rng.uniform(-3, 3, 500)])
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    e, n = serving.to_local(t(lat), t(lon), t(ref[0]), t(ref[1]))
    e_np, n_np = geodesy.to_local(lat, lon, *ref)
    assert np.isfinite(e.numpy()).all() and e[0] == 0 and n[0] == 0  # a receiver at the frame origin
    assert np.abs(e.numpy() - e_np).max() < 1e-6 and np.abs(n.numpy() - n_np).max() < 1e-6
    la, lo = serving.from_local(t(e_np), t(n_np), t(ref[0]), t(ref[1]))
    assert np.abs(la.numpy() - lat).max() < 1e-10 and np.abs(lo.numpy() - lon).max() < 1e-10  # ~10 micrometres


def test_ellipse_matches_the_eigendecomposition():
    from heimdall.serving.graph import ellipse

    rng = np.random.default_rng(1)
    tril = np.zeros((400, 2, 2))
    tril[:, 0, 0] = rng.uniform(10, 20_000, 400)
    tril[:, 1, 1] = rng.uniform(10, 20_000, 400)
    tril[:, 1, 0] = rng.uniform(-20_000, 20_000, 400)
    tril[0] = [[20_000, 0], [0, 1]]  # very thin, east-west: bearing 90
    axes, bearing = (a.numpy().astype(np.float64) for a in ellipse(torch.tensor(tril, dtype=torch.float32)))
    cov = tril @ tril.transpose(0, 2, 1)
    values, vectors = np.linalg.eigh(cov)
    assert np.allclose(axes[:, 0], np.sqrt(values[:, 1]), rtol=1e-5)
    assert np.allclose(axes[:, 1], np.sqrt(values[:, 0]), rtol=1e-4)
    major = vectors[:, :, 1]  # (east, north) of the major axis
    expected = np.degrees(np.arctan2(major[:, 0], major[:, 1])) % 180
    diff = np.abs((bearing - expected + 90) % 180 - 90)
    assert diff.max() < 1e-3 and abs(bearing[0] - 90) < 1e-3 and ((bearing >= 0) & (bearing < 180)).all()


@pytest.fixture(scope="module")
def untrained(small_dataset, tmp_path_factory):
    """A tiny model with its frame and normalisation fitted, saved as a Lightning checkpoint."""
    import lightning

    from heimdall.config import FitConfig
    from heimdall.data.dataset import Dataset
    from heimdall.training.fit import build_module

    config = FitConfig.model_validate({"data": {"uri": small_dataset, "normalization_samples": 256}})
    module = build_module(config, Dataset.open(small_dataset))
    path = tmp_path_factory.mktemp("ckpt") / "untrained.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return module, path


def test_serving_metrics_equal_the_checkpoint_metrics(untrained, small_dataset):
    """The ellipse route (what serving sees) gives the same table as the Cholesky route of training."""
    from heimdall.data.dataset import Dataset
    from heimdall.evaluation.evaluate import predict, split_report
    from heimdall.evaluation.metrics import Metrics, errors_m
    from heimdall.model.loss import gaussian_nll, whiten
    from heimdall.serving.export import TorchPredictor
    from heimdall.training.batch import INPUT_COLUMNS, rebatch, to_inputs

    module, _ = untrained
    dataset = Dataset.open(small_dataset)
    ref = (float(module.model.ref_lat), float(module.model.ref_lon))
    errors, whitened, nll = [], [], []
    with torch.no_grad():
        for cols in rebatch(dataset.iter_shards("test", columns=INPUT_COLUMNS), 256, drop_last=False):
            x = to_inputs(cols, *ref)
            mean, tril = module.model.eval()(x["iq"], x["rx_pos"], x["rx_state"])
            errors.append(errors_m(mean.numpy(), *ref, cols["tx_lat"], cols["tx_lon"]))
            whitened.append(whiten(x["target"], mean, tril).numpy())
            nll.append(gaussian_nll(x["target"], mean, tril).numpy())
    direct = Metrics.of(*(np.concatenate(a) for a in (errors, whitened, nll)))
    pred = predict({"m": TorchPredictor(module.model)}, dataset, "test", with_baseline=False, with_reference=False)
    served = split_report(pred, "m", *ref, "test").model
    for key in ("p50_m", "p68_m", "p95_m"):
        assert getattr(served, key) == pytest.approx(getattr(direct, key), rel=1e-6, abs=0.01)
    assert served.cov1 == pytest.approx(direct.cov1, abs=1 / len(pred["m"]["latitude"]))
    assert served.nll == pytest.approx(direct.nll, rel=1e-4)


@pytest.fixture(scope="module")
def graph(untrained, small_dataset):
    from heimdall.data.dataset import Dataset
    from heimdall.serving.export import export_graph

    module, _ = untrained
    dataset = Dataset.open(small_dataset)
    return export_graph(module.model, dataset.num_receivers, dataset.iq_length, opset=18), dataset


def test_exported_graph_keeps_the_serving_contract(graph, untrained):
    import onnxruntime as ort

    from heimdall.serving.export import OnnxPredictor, TorchPredictor, check_graph

    proto, dataset = graph
    check_graph(proto)  # onnx.checker full check
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(proto.SerializeToString())
    inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    L = dataset.iq_length
    assert inputs == {"iq": ("tensor(int16)", ["batch", "receivers", 2, L]),
                      "rx_pos": ("tensor(double)", ["batch", "receivers", 3]),
                      "rx_state": ("tensor(int8)", ["batch", "receivers"])}
    outputs = {o.name: o.type for o in sess.get_outputs()}
    assert outputs["latitude"] == outputs["longitude"] == "tensor(double)"
    cols = next(dataset.iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    onnx_model, reference = OnnxPredictor(proto.SerializeToString()), TorchPredictor(untrained[0].model)
    for b, r in ((1, 1), (1, 7), (5, 3)):  # batch 1, odd batch, receiver subsets
        args = (cols["iq"][:b, :r], cols["rx_pos"][:b, :r], np.full((b, r), HEARD, np.int8))
        got, want = onnx_model(*args), reference(*args)
        assert got["latitude"].shape == (b,) and got["ellipse_semi_axes_m"].shape == (b, 2)
        assert np.abs(got["east_north_m"] - want["east_north_m"]).max() < 1.0
    with pytest.raises(Exception, match="iq"):  # the IQ length is part of the contract
        onnx_model(cols["iq"][:1, :, :, : L // 2], cols["rx_pos"][:1], cols["rx_state"][:1])


def test_exported_graph_ignores_whatever_absent_receivers_hold(graph):
    """On the graph itself: NaN/inf positions and garbage IQ on absent receivers change nothing;
    silent receivers count; a row that no receiver hears comes out NaN (the contract's "no estimate")."""
    from heimdall.serving.export import OnnxPredictor

    proto, dataset = graph
    cols = next(dataset.iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    iq, rx_pos = cols["iq"][:6].copy(), cols["rx_pos"][:6].copy()
    rx_state = np.full(iq.shape[:2], HEARD, np.int8)
    rx_state[:, 1::2] = ABSENT
    rx_state[:, 2] = SILENT
    absent = rx_state == ABSENT
    onnx_model = OnnxPredictor(proto.SerializeToString())
    want = onnx_model(iq, rx_pos, rx_state)
    for fill in (np.nan, np.inf, -np.inf):
        bad_pos, bad_iq = rx_pos.copy(), iq.copy()
        bad_pos[absent] = fill
        bad_iq[absent] = np.random.default_rng(0).integers(-32768, 32767, bad_iq[absent].shape, dtype=np.int16)
        got = onnx_model(bad_iq, bad_pos, rx_state)
        for key in want:
            assert np.array_equal(got[key], want[key]), (fill, key)
    as_absent = np.where(rx_state == SILENT, ABSENT, rx_state).astype(np.int8)
    assert not np.array_equal(onnx_model(iq, rx_pos, as_absent)["latitude"], want["latitude"])
    rx_state[3] = np.where(rx_state[3] == HEARD, SILENT, rx_state[3])
    got = onnx_model(iq, rx_pos, rx_state)
    assert np.isnan(got["latitude"][3]) and np.isnan(got["ellipse_semi_axes_m"][3]).all()
    assert np.isfinite(np.delete(got["latitude"], 3)).all()


def test_parity_check_catches_a_graph_that_drifted(graph, untrained):
    import onnx
    from onnx import numpy_helper

    from heimdall.evaluation.evaluate import predict
    from heimdall.serving.export import ExportError, OnnxPredictor, TorchPredictor, check_parity

    proto, dataset = graph
    reference = TorchPredictor(untrained[0].model)
    pool = next(dataset.iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    honest = OnnxPredictor(proto.SerializeToString())
    pred = predict({"t": reference, "o": honest}, dataset, "test", with_baseline=False, with_reference=False)
    rows = check_parity(reference, honest, (pred["t"], pred["o"]), pool, 1.0, 1e-3)
    assert rows[0].samples == dataset.count("test") and len(rows) == 11

    drifted = onnx.ModelProto.FromString(proto.SerializeToString())
    weights = max(drifted.graph.initializer, key=lambda t: "head" in t.name and len(t.dims) == 2)
    array = numpy_helper.to_array(weights) * 1.01  # a 1 % change to one layer
    weights.CopyFrom(numpy_helper.from_array(array.astype(np.float32), weights.name))
    bad = OnnxPredictor(drifted.SerializeToString())
    pred = predict({"t": reference, "o": bad}, dataset, "test", with_baseline=False, with_reference=False)
    with pytest.raises(ExportError, match="held-out test split: east/north differs by"):
        check_parity(reference, bad, (pred["t"], pred["o"]), pool, 1.0, 1e-3)


def test_sources_resolve_to_a_checkpoint_and_its_training_run(tmp_path):
    from heimdall.config import ConfigError
    from launch.export import Source, resolve_source, training_run_id

    out = tmp_path / "train-out"
    out.mkdir()
    (out / "train_summary.json").write_text(json.dumps({"best_checkpoint_uri": "s3://runs/a/x/checkpoint_1/checkpoint.ckpt",
                                                         "mlflow_run_id": "abc123"}))
    source = resolve_source(str(out))  # a `heimdall train` output folder
    assert source.checkpoint_uri == "s3://runs/a/x/checkpoint_1/checkpoint.ckpt"
    assert training_run_id(source, registry=None) == "abc123"
    assert resolve_source("s3://runs/a/x/checkpoint_1").checkpoint_uri == "s3://runs/a/x/checkpoint_1/checkpoint.ckpt"
    assert training_run_id(Source("/tmp/best.ckpt"), registry=None) is None
    with pytest.raises(ConfigError, match="no such file"):
        resolve_source(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="no sweep_summary.json, train_summary.json or checkpoint.ckpt"):
        resolve_source(str(tmp_path))


# ---- the real thing: sweep -> ONNX -> S3 -> MLflow registry ----------------------------------------
def export_config(mlflow_uri, out, *extra) -> ExportConfig:
    return load_config(None, [f"mlflow.tracking_uri={mlflow_uri}", f"export.models_uri=s3://{MODELS_BUCKET}/heimdall",
                              f"export.out_dir={out}", *extra], schema=ExportConfig)


def s3_objects(prefix: str = "") -> dict[str, dict]:
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=MODELS_BUCKET, Prefix=prefix)
    return {o["Key"]: o for o in listing.get("Contents", [])}


@pytest.fixture(scope="module")
def first_export(asha_sweep, s3_server, mlflow_server, tmp_path_factory):
    import boto3

    from launch.export import export_model

    boto3.client("s3").create_bucket(Bucket=MODELS_BUCKET)
    _, sweep, _ = asha_sweep
    summary = Path(sweep.out_dir) / "sweep_summary.json"
    # A lowered multipart threshold: the ~1 MB tiny model goes up as a multipart upload (one part: S3's
    # parts are at least 5 MiB but the last).
    config = export_config(mlflow_server, tmp_path_factory.mktemp("export"), f"export.source={summary}",
                           "export.multipart_threshold_mb=0.25", "export.multipart_chunk_mb=5")
    lines = []
    outcome = export_model(config, log=lines.append)
    return config, outcome, "\n".join(lines), sweep


@pytest.mark.timeout(600)
def test_export_of_the_sweeps_best_trial(first_export, mlflow_server, train_dataset):
    import boto3
    import mlflow
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    config, outcome, console, sweep = first_export
    # The serving copy: content-addressed, uploaded in parts, the bytes we exported.
    key = f"heimdall/{outcome.sha256}.onnx"
    assert outcome.serving_uri == f"s3://{MODELS_BUCKET}/{key}" and outcome.uploaded
    head = boto3.client("s3").head_object(Bucket=MODELS_BUCKET, Key=key)
    assert head["ETag"].strip('"').rsplit("-", 1)[-1].isdigit() and "-" in head["ETag"], "not a multipart upload"
    body = boto3.client("s3").get_object(Bucket=MODELS_BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == outcome.sha256 == head["Metadata"]["sha256"]
    assert Path(outcome.out_dir, "model.onnx").read_bytes() == body
    # The accuracy table comes from the ONNX outputs and the model learned.
    test = outcome.test
    assert test.producer == "onnx" and test.model.p68_m <= 0.5 * test["centroid"].p68_m, test
    assert "physics baseline" in test and "reference" in test and "computed from the ONNX outputs" in console
    assert "model (ONNX)" in console and "P68 / ref" in console
    assert all(p["east_north_m"] < 1.0 for p in outcome.parity) and len(outcome.parity) == 11
    # The ONNX file holds what depends on the checkpoint alone; provenance and measurements are tags.
    meta = ort.InferenceSession(body).get_modelmeta().custom_metadata_map
    client = MlflowClient(mlflow_server)
    best_run = client.search_runs([client.get_experiment_by_name("heimdall").experiment_id],
                                  f"attributes.run_name = 'asha-{sweep.summary['best_trial']}'")[0]
    assert meta["training.dataset_manifest_sha256"] == best_run.data.tags["dataset.manifest_sha256"]
    assert json.loads(meta["heimdall.contract"])["inputs"]["iq"]["dtype"] == "int16"
    assert not [k for k in meta if k.startswith(("training.run", "training.checkpoint", "evaluation.", "metrics"))]
    assert not [v for v in meta.values() if best_run.info.run_id in v or "epoch_" in v]
    # The registry: version linked to the training run, provenance and measured metrics as tags.
    version = client.get_model_version("heimdall-localizer", outcome.version)
    assert version.run_id == best_run.info.run_id == version.tags["training_run_id"] == outcome.training_run_id
    assert float(version.tags["test_p68_m"]) == pytest.approx(test.model.p68_m, rel=1e-5)
    assert float(version.tags["test_reference_p68_m"]) == pytest.approx(test["reference"].p68_m, rel=1e-5)
    assert version.tags["heimdall.producer"] == "onnx"
    assert version.tags["checkpoint"] == sweep.summary["best_checkpoint_uri"]
    assert version.tags["sha256"] == outcome.sha256 and version.tags["serving_uri"] == outcome.serving_uri
    assert int(version.tags["onnx_opset"]) >= 17 and float(version.tags["test_p68_m"]) > 0
    assert outcome.aliases == ["candidate", "champion"] and "no champion yet" in outcome.champion_reason
    # Loaded back by alias through MLflow, it is the same model and gives the same outputs.
    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.onnx.load_model("models:/heimdall-localizer@champion")
    assert hashlib.sha256(loaded.SerializeToString()).hexdigest() == outcome.sha256
    from heimdall.data.dataset import Dataset
    from heimdall.serving.export import OnnxPredictor

    cols = next(Dataset.open(train_dataset).iter_shards("test"))
    args = (cols["iq"][:5], cols["rx_pos"][:5], cols["rx_state"][:5])
    a, b = OnnxPredictor(loaded.SerializeToString())(*args), OnnxPredictor(body)(*args)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # The ONNX metrics, under the same names, went to an export run nested under the training run.
    nested = client.search_runs([best_run.info.experiment_id], f"tags.mlflow.parentRunId = '{best_run.info.run_id}' "
                                "and tags.`heimdall.producer` = 'onnx'")
    assert len(nested) == 1 and nested[0].data.metrics["test_p68_m"] == pytest.approx(test.model.p68_m)


@pytest.mark.timeout(300)
def test_export_again_is_idempotent(first_export, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from launch.export import export_model

    config, outcome, _, _ = first_export
    before = s3_objects("heimdall/")
    again = export_model(config, log=lambda *_: None)
    assert again.sha256 == outcome.sha256 and not again.uploaded and again.version == outcome.version
    assert s3_objects("heimdall/").keys() == before.keys()
    assert len(MlflowClient(mlflow_server).search_model_versions("name = 'heimdall-localizer'")) == 1


@pytest.mark.timeout(400)
def test_the_same_checkpoint_from_another_source_is_the_same_model(first_export, mlflow_server, tmp_path):
    """Identity is the weights and graph: named by its checkpoint instead of its sweep's summary (no
    training run found, another output folder), the export has the same bytes and no new version."""
    from mlflow.tracking import MlflowClient

    from launch.export import export_model

    config, outcome, _, sweep = first_export
    direct = config.model_copy(deep=True)
    direct.export.source, direct.export.out_dir = sweep.summary["best_checkpoint_uri"], str(tmp_path)
    again = export_model(direct, log=lambda *_: None)
    assert again.sha256 == outcome.sha256 and again.version == outcome.version and not again.uploaded
    assert len(MlflowClient(mlflow_server).search_model_versions("name = 'heimdall-localizer'")) >= 1
    assert Path(again.out_dir, "model.onnx").read_bytes() == Path(outcome.out_dir, "model.onnx").read_bytes()


@pytest.mark.timeout(600)
def test_two_exports_together_leave_one_version_and_no_alias_on_an_unverified_artifact(first_export, mlflow_server,
                                                                                     tmp_path):
    from mlflow.tracking import MlflowClient

    _, outcome, _, sweep = first_export
    args = ["--from", sweep.summary["best_checkpoint_uri"], f"mlflow.tracking_uri={mlflow_server}",
            f"export.models_uri=s3://{MODELS_BUCKET}/twins", "export.model_name=twins", "export.random_batches=1"]
    procs = [subprocess.Popen([HEIMDALL_BIN, "export", *args, f"export.out_dir={tmp_path / str(i)}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions("name = 'twins'")
    assert len(versions) == 1 and versions[0].tags["sha256"] == outcome.sha256, [v.version for v in versions]
    assert list(s3_objects("twins/")) == [f"twins/{outcome.sha256}.onnx"]
    assert client.get_model_version_by_alias("twins", "champion").version == versions[0].version
    # The registered version's serving copy gone (its tag points at a missing object): exporting the
    # model again finds the version, and refuses to move any alias to it.
    client.set_model_version_tag("twins", versions[0].version, "serving_uri", f"s3://{MODELS_BUCKET}/twins/gone.onnx")
    client.delete_registered_model_alias("twins", "candidate")
    r = cli("export", *args, f"export.out_dir={tmp_path / 'again'}", timeout=300)
    assert r.returncode != 0 and "no alias moved" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "candidate" not in client.get_registered_model("twins").aliases


@pytest.mark.timeout(400)
def test_a_worse_model_is_candidate_but_not_champion(first_export, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from launch.export import export_model

    config, outcome, _, sweep = first_export
    worst = max((r for r in sweep.table if r["checkpoint"]), key=lambda r: r["best"])
    worse_config = config.model_copy(deep=True)
    worse_config.export.source = worst["checkpoint"]
    lines = []
    worse = export_model(worse_config, log=lines.append)
    client = MlflowClient(mlflow_server)
    assert worse.version != outcome.version and worse.aliases == ["candidate"]
    assert "does not beat" in worse.champion_reason and "same test split" in worse.champion_reason
    assert client.get_model_version_by_alias("heimdall-localizer", "champion").version == outcome.version
    assert client.get_model_version_by_alias("heimdall-localizer", "candidate").version == worse.version
    assert f"@champion stays version {outcome.version}" in "\n".join(lines)
    # --force promotes it, and the registry records who moved the alias, when and why.
    worse_config.export.force_champion = True
    forced = export_model(worse_config, log=lambda *_: None)
    assert forced.version == worse.version and "champion" in forced.aliases and "--force" in forced.champion_reason
    from heimdall.registry.client import Registry

    audit = [a for a in Registry(mlflow_server, "heimdall").audit("heimdall-localizer") if a["alias"] == "champion"]
    assert [(a["from"], a["to"]) for a in audit][-2:] == [(None, outcome.version), (outcome.version, worse.version)]
    assert audit[-1]["by"] and audit[-1]["at"] and "--force" in audit[-1]["reason"]


@pytest.mark.timeout(400)
def test_failed_parity_uploads_nothing_and_registers_nothing(first_export, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, outcome, _, sweep = first_export
    # Tolerances of 0 cannot be met ("strictly under"): the gate must stop everything after it.
    out = cli("export", "--from", str(Path(sweep.out_dir) / "sweep_summary.json"),
              f"mlflow.tracking_uri={mlflow_server}",
              f"export.models_uri=s3://{MODELS_BUCKET}/parity-fail", "export.model_name=parity-fail",
              "export.parity_tolerance_m=0", "export.ellipse_rtol=0", f"export.out_dir={tmp_path}", timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "ONNX Runtime does not reproduce PyTorch" in out.stderr and "Traceback" not in out.stderr
    assert s3_objects("parity-fail/") == {}
    assert MlflowClient(mlflow_server).search_registered_models("name = 'parity-fail'") == []
    assert list(tmp_path.iterdir()) == []  # no local outputs that look complete either


@pytest.mark.timeout(120)
def test_unreachable_s3_fails_fast_and_registers_nothing(first_export, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, _, _, sweep = first_export
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    out = cli("export", "--from", str(Path(sweep.out_dir) / "sweep_summary.json"),
              f"mlflow.tracking_uri={mlflow_server}",
              f"export.models_uri=s3://{MODELS_BUCKET}/down", f"export.s3_endpoint={dead}",
              "export.model_name=s3-down", f"export.out_dir={tmp_path}", timeout=300)
    assert out.returncode == 1 and "unreachable" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert time.perf_counter() - start < 60
    assert MlflowClient(mlflow_server).search_registered_models("name = 's3-down'") == []
    missing = cli("export", "--from", str(Path(sweep.out_dir) / "sweep_summary.json"),
                  f"mlflow.tracking_uri={mlflow_server}",
                  "export.models_uri=s3://no-such-bucket/x", f"export.out_dir={tmp_path}", timeout=300)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_export_config_errors_are_clear():
    out = cli("export", timeout=60)
    assert out.returncode == 2 and "nothing to export: give --from" in out.stderr
    out = cli("export", "--from", "x", "export.parity_tolerance=1", timeout=60)
    assert out.returncode == 2 and "unknown config key 'export.parity_tolerance'" in out.stderr


@pytest.mark.timeout(300)
def test_fit_output_exports_with_mlflow_disabled(trained_checkpoint, tmp_path):
    """The one-machine path: `heimdall fit` leaves what `export --from OUT_DIR` needs, and
    mlflow.enabled=false means no MLflow at all (the tracking URI here answers nothing)."""
    out_dir = Path(trained_checkpoint).parents[1]
    summary = json.loads((out_dir / "train_summary.json").read_text())
    assert Path(summary["best_checkpoint_uri"]) == Path(trained_checkpoint).resolve() and summary["test"]["rows"]["model"]
    r = cli("export", "--from", str(out_dir), "mlflow.enabled=false", "mlflow.tracking_uri=http://127.0.0.1:9",
            f"export.models_uri={tmp_path / 'models'}", f"export.out_dir={tmp_path / 'export'}",
            "export.random_batches=1", timeout=300)
    assert r.returncode == 0 and "not registered: mlflow.enabled=false" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(list((tmp_path / "models").glob("*.onnx"))) == 1 and list((tmp_path / "export").glob("*/model.onnx"))


def test_settings_a_service_would_refuse_are_refused_at_load_time():
    out = cli("export", "--from", "x", "export.multipart_chunk_mb=1", timeout=60)
    assert out.returncode == 2 and "export.multipart_chunk_mb" in out.stderr and "5" in out.stderr, out.stderr
