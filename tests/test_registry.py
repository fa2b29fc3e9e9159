"""`heimdall models list|promote|rollback` against a real `mlflow server`: the champion gate shared
with export, the audit trail, rollback through it, and refusals that change nothing."""
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import OPS_MODEL, cli_in_process, export_checkpoint, fit_tiny


@pytest.mark.timeout(900)
def test_registry_promote_rollback_round_trip(exported_model, train_dataset, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from heimdall.registry.client import actor

    client = MlflowClient(mlflow_server)

    def models(*args):
        return cli_in_process(capsys, "models", *args, f"mlflow.tracking_uri={mlflow_server}")

    def champion() -> str:
        return client.get_model_version_by_alias(OPS_MODEL, "champion").version

    def audit() -> list[dict]:
        tags = client.get_registered_model(OPS_MODEL).tags
        return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("audit.")]

    a = exported_model
    assert champion() == a.version
    # Two worse versions: barely trained weights (two learning rates: two models). The same weights
    # exported again would be the same file, hence the same version.
    b = export_checkpoint(fit_tiny(train_dataset, tmp_path / "fit-b", epochs=1, lr=1e-6), mlflow_server, tmp_path / "b")
    c = export_checkpoint(fit_tiny(train_dataset, tmp_path / "fit-c", epochs=1, lr=2e-6), mlflow_server, tmp_path / "c")
    for o in (b, c):  # the export gate kept the champion
        assert o.aliases == ["candidate"] and "does not beat" in o.champion_reason
    assert champion() == a.version and len({a.version, b.version, c.version}) == 3

    # list: every version with aliases, metrics in metres, hashes, serving copies; the history.
    rc, out = models("list", OPS_MODEL)
    assert rc == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert rows[a.version].split()[1] == "champion" and rows[c.version].split()[1] == "candidate"
    assert rows[b.version].split()[1] == "-"
    for o in (a, b, c):
        assert o.sha256[:12] in rows[o.version] and rows[o.version].endswith(o.serving_uri)
        assert f"{o.test.model.p68_m:,.0f}" in rows[o.version]
        assert o.sha256 in out
    assert re.search(rf"export +candidate: {b.version} -> {c.version}", out)

    # The gate refuses the worse version and changes nothing.
    before = audit()
    rc, err = models("promote", OPS_MODEL, b.version)
    assert rc == 1 and "does not beat" in err and f"stays version {a.version}" in err and "Traceback" not in err
    assert champion() == a.version and audit() == before

    # --force moves it, and the audit tag says who, when, from, to, why and how.
    started = datetime.now(timezone.utc).replace(microsecond=0)
    rc, err = models("promote", OPS_MODEL, b.version, "--force", "--reason", "canary on b")
    assert rc == 0, err
    assert champion() == b.version
    record = audit()[-1]
    assert (record["alias"], record["from"], record["to"], record["action"]) == ("champion", a.version, b.version, "promote")
    assert record["by"] == actor() and "canary on b" in record["reason"] and "--force" in record["reason"]
    assert started <= datetime.fromisoformat(record["at"]) <= datetime.now(timezone.utc)
    # Promoting the champion again: said, exit 0, nothing recorded.
    n = len(audit())
    rc, out = models("promote", OPS_MODEL, b.version)
    assert rc == 0 and "already the champion" in out and len(audit()) == n
    rc, err = models("promote", OPS_MODEL, c.version, "--force")
    assert rc == 0, err

    # Rollbacks walk back through the holders (c -> b -> a), not back and forth.
    for expected in (b.version, a.version):
        rc, err = models("rollback", OPS_MODEL, "--reason", "bad canary")
        assert rc == 0, err
        assert champion() == expected
        assert audit()[-1]["action"] == "rollback" and audit()[-1]["to"] == expected
        assert audit()[-1]["reason"] == "bad canary"
    n = len(audit())
    rc, err = models("rollback", OPS_MODEL)
    assert rc == 1 and "no earlier champion" in err and champion() == a.version and len(audit()) == n

    # An alias moved outside heimdall: rollback cannot know the previous holder and refuses.
    client.set_registered_model_alias(OPS_MODEL, "champion", c.version)
    rc, err = models("rollback", OPS_MODEL)
    assert rc == 1 and "outside heimdall" in err and champion() == c.version and len(audit()) == n
    client.set_registered_model_alias(OPS_MODEL, "champion", a.version)

    # A version whose serving copy is gone is never made champion, not even with --force.
    Path(c.serving_uri).unlink()
    rc, err = models("promote", OPS_MODEL, c.version, "--force")
    assert rc == 1 and "serving copy is missing or altered" in err and f"stays version {a.version}" in err
    assert champion() == a.version and len(audit()) == n
    rc, err = models("promote", OPS_MODEL, "999")
    assert rc == 2 and "has no version 999" in err


@pytest.mark.timeout(600)
def test_gate_measures_both_versions_when_their_test_splits_differ(exported_model, trained_checkpoint, train_dataset,
                                                                   small_dataset, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from heimdall.data.dataset import Dataset
    from heimdall.registry.promotion import gate, measure_p68
    from heimdall.registry.client import Registry

    client, registry, a = MlflowClient(mlflow_server), Registry(mlflow_server, "heimdall"), exported_model
    tags = client.get_model_version(OPS_MODEL, a.version).tags
    assert tags["test_data_uri"] == str(Path(train_dataset).resolve())
    # Measured from the registered ONNX model: the P68 that export recorded.
    assert measure_p68(registry, OPS_MODEL, a.version, Dataset.open(train_dataset)) == \
        pytest.approx(float(tags["test_p68_m"]), rel=1e-4)
    # A worse model evaluated on another dataset at export: a version with another test split.
    name = "heimdall-ops-gate"
    first = export_checkpoint(trained_checkpoint, mlflow_server, tmp_path / "first", f"export.model_name={name}")
    worse = fit_tiny(train_dataset, tmp_path / "fit", epochs=1, lr=1e-6)
    other = export_checkpoint(worse, mlflow_server, tmp_path / "other", f"export.model_name={name}",
                              f"export.data_uri={small_dataset}")
    assert first.aliases == ["candidate", "champion"] and other.aliases == ["candidate"]
    version = client.get_model_version(name, other.version)
    assert version.tags["test_split"] != client.get_model_version(name, first.version).tags["test_split"]
    decision = gate(registry, name, version, data_uri=str(Path(train_dataset).resolve()))
    assert f"measured version {other.version} on the test split of {Path(train_dataset).resolve()}" in decision.reason
    mine, held = (int(x.replace(",", "")) for x in re.search(
        rf"test P68 ([\d,]+) m does not beat version {first.version}'s ([\d,]+) m", decision.reason).groups())
    # Both measured on the same split: the champion's number is what its export recorded there.
    assert mine > held and held == pytest.approx(first.test.model.p68_m, abs=1)
    # Without a dataset to compare on, the gate says so and refuses unless forced.
    client.delete_model_version_tag(name, other.version, "test_data_uri")
    version = client.get_model_version(name, other.version)
    refused, forced = gate(registry, name, version), gate(registry, name, version, force=True)
    assert not refused.promote and "records no test_data_uri" in refused.reason and "--data" in refused.reason
    assert forced.promote and forced.reason.startswith("--force")


@pytest.mark.timeout(600)
def test_promote_and_rollback_on_a_local_sqlite_store(trained_checkpoint, tmp_path, capsys):
    """The default store (sqlite, no server) returns version numbers as int where the REST server
    gives str: aliases, the gate and the rollback history must not depend on which."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    first = export_checkpoint(trained_checkpoint, store, tmp_path)
    second = export_checkpoint(trained_checkpoint, store, tmp_path, "export.opset=17")  # same weights, new bytes
    assert (first.version, second.version) == ("1", "2") and "champion" not in second.aliases

    uri = f"mlflow.tracking_uri={store}"
    code, out = cli_in_process(capsys, "models", "list", OPS_MODEL, uri)
    assert code == 0 and "candidate" in out.split("\n")[2] and "champion" in out.split("\n")[3], out
    assert cli_in_process(capsys, "models", "promote", OPS_MODEL, "2", uri, "--force")[0] == 0
    assert cli_in_process(capsys, "models", "promote", OPS_MODEL, "2", uri)[1].endswith("already the champion: nothing to do\n")
    code, out = cli_in_process(capsys, "models", "rollback", OPS_MODEL, uri)
    assert code == 0 and "-> version 1" in out, out
    code, _ = cli_in_process(capsys, "models", "rollback", OPS_MODEL, uri)
    assert code == 1
    from mlflow.tracking import MlflowClient

    assert str(MlflowClient(store).get_model_version_by_alias(OPS_MODEL, "champion").version) == "1"
