"""Who holds `champion`: the one gate shared by `heimdall export` and `heimdall models promote`,
and the registry commands `heimdall models list|promote|rollback`.

The gate compares test P68 on one test split: the versions' tags when both were measured on the
same split, otherwise both ONNX models run on a common dataset's test split (the promoted
version's `test_data_uri`, or one given). Rollback replays the `champion` audit trail as a stack,
so two rollbacks in a row go back two holders. No alias is pointed at a version whose MLflow model
or serving copy does not read back with its recorded sha256.
"""
from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path


from heimdall.evaluation.metrics import METRICS, metric_name
from heimdall.registry.client import CHAMPION, DATA_TAG, P68_TAG, SPLIT_TAG, Decision, Registry, champion_decision
from heimdall.tracking import redact



class PromotionError(RuntimeError):
    """A refused alias change: the gate, a missing artifact, or a history that does not match."""


def data_ref(uri: str) -> str:
    """A dataset URI that opens from any working directory."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def require_model(registry: Registry, name: str) -> None:
    if not registry.exists(name):
        raise ValueError(f"no registered model {name!r} at {redact(registry.uri)}")


def version_of(registry: Registry, name: str, version: str):
    import mlflow

    try:
        return registry.client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"{name} has no version {version} at {redact(registry.uri)}") from None


# ---- the gate ---------------------------------------------------------------------------------------
def tagged_p68(version, split: str) -> float | None:
    return float(version.tags[P68_TAG]) if version.tags.get(SPLIT_TAG) == split and P68_TAG in version.tags else None


def measure_p68(registry: Registry, name: str, version: str, dataset) -> float:
    """Test P68 of a registered version's ONNX model (as MLflow stores it) on a dataset's test split."""
    from heimdall.evaluation.evaluate import predict
    from heimdall.evaluation.metrics import Metrics
    from heimdall.geodesy import haversine_m
    from heimdall.serving.export import OnnxPredictor

    with tempfile.TemporaryDirectory() as tmp:
        predictor = OnnxPredictor(registry.download_version(name, version, Path(tmp)))
    pred = predict({"m": predictor}, dataset, "test", 256, with_baseline=False, with_reference=False)
    out, truth = pred["m"], pred["truth"]
    return Metrics.of(haversine_m(out["latitude"], out["longitude"], truth["tx_lat"], truth["tx_lon"])).p68_m


def gate(registry: Registry, name: str, version, force: bool = False, dataset=None, data_uri: str | None = None) -> Decision:
    """Whether `version` (an MLflow ModelVersion) may take `champion`. With neither `dataset` nor
    `data_uri`, the tags decide when both versions were measured on the same split; otherwise both
    are measured on the test split of `dataset`, `data_uri`, or the version's own test dataset."""
    from heimdall.data.dataset import Dataset

    champion = registry.by_alias(name, CHAMPION)
    if champion is None:
        return champion_decision(0.0, "", None, None, force)
    holder, mine_v = {"version": champion.version}, version.version
    if dataset is None and data_uri is None:
        split = version.tags.get(SPLIT_TAG, "")
        mine, held = tagged_p68(version, split), tagged_p68(champion, split)
        if mine is not None and held is not None:
            return champion_decision(mine, split, holder, held, force)
        own, why = version.tags.get(DATA_TAG), f"version {mine_v} records no {DATA_TAG}"
        try:
            dataset = Dataset.open(own) if own else None
        except (ValueError, OSError) as e:
            why = f"version {mine_v}'s test dataset is not readable ({redact(e)})"
        if dataset is None:
            what = f"versions {mine_v} and {champion.version} were not measured on the same test split and {why}"
            return Decision(True, f"--force ({what})") if force else \
                Decision(False, f"{what}; give --data URI to measure both, or use --force to promote anyway")
    if dataset is None:
        dataset = Dataset.open(data_uri)
    split = f"{dataset.manifest_sha256}:test"
    mine, held, measured = tagged_p68(version, split), tagged_p68(champion, split), []
    if mine is None:
        mine = measure_p68(registry, name, mine_v, dataset)
        measured.append(mine_v)
    if held is None:
        try:
            held = measure_p68(registry, name, champion.version, dataset)
            measured.append(champion.version)
        except Exception:  # noqa: BLE001 - an unreadable champion cannot be compared; the gate says so
            pass
    decision = champion_decision(mine, split, holder, held, force)
    if measured:
        decision.reason += (f" (measured {' and '.join(f'version {v}' for v in measured)} on the test split of "
                            f"{redact(dataset.uri)})")
    return decision


# ---- artifacts ----------------------------------------------------------------------------------------
def check_artifacts(registry: Registry, name: str, version) -> None:
    """The version's MLflow model downloads and holds its recorded sha256, and its serving copy
    verifies in the model store (S3 endpoint from AWS_ENDPOINT_URL_S3)."""
    from heimdall.registry.store import StoreError, file_sha256, open_store

    where, sha, serving = f"version {version.version}", version.tags.get("sha256"), version.tags.get("serving_uri")
    if not sha or not serving:
        raise PromotionError(f"{where} records no sha256/serving_uri (not a heimdall export)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = registry.download_version(name, version.version, Path(tmp))
            got, size = file_sha256(path), path.stat().st_size
        except Exception as e:  # noqa: BLE001 - whatever the cause, it cannot serve
            raise PromotionError(f"{where}'s MLflow model cannot be downloaded: {redact(str(e).splitlines()[0])}") from None
    if got != sha:
        raise PromotionError(f"{where}'s MLflow model has sha256 {got}, not the recorded {sha}")
    try:
        open_store(serving.rsplit("/", 1)[0]).verify(serving, sha, size)
    except (StoreError, OSError, ValueError) as e:
        raise PromotionError(f"{where}'s serving copy is missing or altered: {redact(e)}") from None


# ---- commands ---------------------------------------------------------------------------------------
def promote(registry: Registry, name: str, version: str, force: bool = False, data_uri: str | None = None,
            reason: str = "", log=print) -> Decision | None:
    """Move `champion` to `version` if the gate allows (or --force) and its artifacts are there.
    Returns None when it already holds `champion` (nothing recorded)."""
    require_model(registry, name)
    target = version_of(registry, name, version)
    champion = registry.by_alias(name, CHAMPION)
    if champion is not None and str(champion.version) == str(target.version):
        log(f"{name} version {target.version} is already the champion: nothing to do")
        return None
    stays = f"{name}@{CHAMPION} stays version {champion.version}" if champion else f"{name} still has no {CHAMPION}"
    try:
        check_artifacts(registry, name, target)
    except PromotionError as e:
        raise PromotionError(f"not promoted: {e}; {stays}") from None
    decision = gate(registry, name, target, force, data_uri=data_ref(data_uri) if data_uri else None)
    if not decision.promote:
        raise PromotionError(f"not promoted: {decision.reason}; {stays}")
    registry.set_alias(name, CHAMPION, target.version, f"{reason} ({decision.reason})" if reason else decision.reason,
                       action="promote")
    log(f"{name}@{CHAMPION} -> version {target.version} (was {champion.version if champion else 'none'}): {decision.reason}")
    return decision


def champion_history(records: list[dict]) -> list[str]:
    """Holders of `champion`, oldest first, replayed from the audit trail: a rollback pops. A
    record's `from` is who held it then, which also covers a change made outside heimdall before."""
    stack: list[str] = []
    for r in records:
        if r.get("alias") != CHAMPION:
            continue
        if r.get("action") == "rollback":
            if stack:
                stack.pop()
            continue
        if r.get("from") and (not stack or stack[-1] != str(r["from"])):
            stack.append(str(r["from"]))
        stack.append(str(r["to"]))
    return stack


def rollback(registry: Registry, name: str, reason: str = "", log=print) -> str:
    """Move `champion` back to the holder before the current one; returns that version."""
    require_model(registry, name)
    current = registry.by_alias(name, CHAMPION)
    if current is None:
        raise PromotionError(f"{name} has no {CHAMPION}: nothing to roll back")
    stack = champion_history(registry.audit(name))
    if not stack or stack[-1] != str(current.version):
        recorded = f"version {stack[-1]}" if stack else "no holder"
        raise PromotionError(f"{name}@{CHAMPION} is version {current.version} but heimdall's audit trail says {recorded}: "
                             f"the alias was moved outside heimdall, so the previous holder is unknown; not rolled "
                             f"back (set it with `heimdall models promote {name} VERSION`)")
    if len(stack) < 2:
        raise PromotionError(f"{name}: no earlier {CHAMPION} to roll back to (version {current.version} is the first "
                             "recorded holder)")
    try:
        target = version_of(registry, name, stack[-2])
        check_artifacts(registry, name, target)
    except (PromotionError, ValueError) as e:
        raise PromotionError(f"not rolled back to version {stack[-2]}: {e}; {name}@{CHAMPION} stays version "
                             f"{current.version}") from None
    registry.set_alias(name, CHAMPION, target.version, reason or f"rollback from version {current.version}",
                       action="rollback")
    log(f"{name}@{CHAMPION} -> version {target.version} (rolled back from version {current.version})")
    return target.version


def list_versions(registry: Registry, name: str) -> list[dict]:
    """Every version, newest first: aliases, test metrics, serving copy and provenance."""
    require_model(registry, name)
    held: dict[str, list[str]] = {}
    for alias, v in (registry.client.get_registered_model(name).aliases or {}).items():
        held.setdefault(str(v), []).append(alias)
    rows = []
    for v in sorted(registry.client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        t = v.tags
        rows.append({"version": v.version, "aliases": sorted(held.get(str(v.version), [])),
                     "created": datetime.fromtimestamp(v.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     **{k: _float(t.get(metric_name("test", k))) for k in METRICS},
                     "reference_p68_m": _float(t.get(metric_name("test", "p68_m", "reference"))),
                     "baseline_p68_m": _float(t.get(metric_name("test", "p68_m", "physics baseline"), t.get(OLD_BASELINE_TAG))),
                     "old_tags": [OLD_BASELINE_TAG] if OLD_BASELINE_TAG in t else [],
                     "serving_uri": t.get("serving_uri"), "sha256": t.get("sha256"),
                     "training_run_id": t.get("training_run_id") or v.run_id, "source": v.source})
    return rows


OLD_BASELINE_TAG = "baseline_test_p68_m"  # deprecated spelling of test_baseline_p68_m, still read


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def format_versions(registry: Registry, name: str, history: int = 10) -> str:
    rows = list_versions(registry, name)
    lines = [f"{name} at {redact(registry.uri)}: {len(rows)} version(s); metres on each version's test split",
             f"{'version':>7}  {'aliases':<20}{'created (UTC)':<18}{'P50 m':>9}{'P68 m':>9}{'P95 m':>9}{'cov1':>7}"
             f"{'cov2':>7}{'ref P68':>9}{'base P68':>10}  {'sha256':<14}serving copy"]

    def cell(v, width, fmt):
        return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}}"
    for r in rows:
        lines.append(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20}{r['created']:<18}"
                     f"{cell(r['p50_m'], 9, ',.0f')}{cell(r['p68_m'], 9, ',.0f')}{cell(r['p95_m'], 9, ',.0f')}"
                     f"{cell(r['cov1'], 7, '.3f')}{cell(r['cov2'], 7, '.3f')}{cell(r['reference_p68_m'], 9, ',.0f')}"
                     f"{cell(r['baseline_p68_m'], 10, ',.0f')}"
                     f"  {(r['sha256'] or '-')[:12]:<14}{r['serving_uri'] or '-'}")
    old = [r["version"] for r in rows if r["old_tags"]]
    if old:
        lines.append(f"deprecated: version(s) {', '.join(old)} carry the tag {OLD_BASELINE_TAG} "
                     f"(read as {metric_name('test', 'p68_m', 'physics baseline')})")
    lines.append("provenance:")
    lines += [f"  version {r['version']}: sha256 {r['sha256'] or '-'}, training run {r['training_run_id'] or '-'}, "
              f"MLflow model {r['source']}" for r in rows]
    records = registry.audit(name)[-history:]
    lines.append(f"alias history (last {len(records)}, oldest first):")
    lines += [f"  {r['at']}  {r['by']}  {r.get('action', 'export'):<8} {r['alias']}: "
              f"{r['from'] or '-'} -> {r['to']}  ({r['reason']})" for r in records]
    return "\n".join(lines)
