"""The evaluation report of `heimdall evaluate`: tables per split and per number of active
receivers beside the physics baseline and the centroid, the error CDF and a prediction map, as
Markdown or HTML, plus metrics.json. Written to a temp folder and renamed: a report folder that
exists is complete."""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import numpy as np

from heimdall.geodesy import ellipse_outline, haversine_m
from heimdall.evaluation.metrics import IDEAL_COVERAGE

COLUMNS = (("p50_m", "P50 m", "{:,.0f}"), ("p68_m", "P68 m", "{:,.0f}"), ("p95_m", "P95 m", "{:,.0f}"),
           ("cov1", "cov 1σ", "{:.3f}"), ("cov2", "cov 2σ", "{:.3f}"), ("nll", "NLL", "{:.2f}"))


def metrics_json(evaluation: dict) -> dict:
    return {split: {"count": e["count"], "rows": e["rows"],
                    "by_active_receivers": {str(k): {"count": e["count_by_receivers"][k], "rows": rows}
                                            for k, rows in e["by_receivers"].items()}}
            for split, e in evaluation.items()}


def table(rows: dict[str, dict[str, float]], first: str = "") -> list[list[str]]:
    head = [first] + [label for _, label, _ in COLUMNS]
    body = [[name] + [fmt.format(m[k]) if k in m else "-" for k, _, fmt in COLUMNS] for name, m in rows.items()]
    return [head] + body


def receivers_table(e: dict) -> list[list[str]]:
    head = ["active receivers", "captures", "model P50 m", "model P68 m", "baseline P68 m", "centroid P68 m"]
    body = []
    for k, rows in e["by_receivers"].items():
        base = rows.get("physics baseline", {}).get("p68_m")
        body.append([str(k), f"{e['count_by_receivers'][k]:,}", f"{rows['model']['p50_m']:,.0f}",
                     f"{rows['model']['p68_m']:,.0f}", "-" if base is None else f"{base:,.0f}",
                     f"{rows['centroid']['p68_m']:,.0f}"])
    return [head] + body


def text_table(t: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in t)


def _md(t: list[list[str]]) -> str:
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in t[1:]])


def _html(t: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def plots_for(split: str, e: dict, model, receivers: list[dict], folder: Path, ellipses: int = 25) -> list[Path]:
    from heimdall.evaluation import plots

    pred, truth = e["pred"]["model"], e["pred"]["truth"]
    errors = {"model": haversine_m(pred["latitude"], pred["longitude"], truth["tx_lat"], truth["tx_lon"])}
    if "baseline_lat" in truth:
        errors["physics baseline"] = haversine_m(truth["baseline_lat"], truth["baseline_lon"], truth["tx_lat"], truth["tx_lon"])
    errors["centroid"] = haversine_m(model.ref_lat, model.ref_lon, truth["tx_lat"], truth["tx_lon"])
    n = min(300, len(pred["latitude"]))
    outlines = [ellipse_outline(*pred["east_north_m"][i].astype(float), *pred["ellipse_semi_axes_m"][i].astype(float),
                                float(pred["ellipse_orientation_deg"][i]), model.ref_lat, model.ref_lon)
                for i in range(min(ellipses, n))]
    return [plots.error_cdf(errors, folder / f"{split}_error_cdf.png"),
            plots.serving_map(pred["latitude"][:n], pred["longitude"][:n], outlines, truth["tx_lat"][:n],
                              truth["tx_lon"][:n], receivers, folder / f"{split}_map.png",
                              f"{split}: {n} captures, {len(outlines)} ellipses")]


def write_report(evaluation: dict, model, dataset, out_dir: Path, fmt: str = "md") -> Path:
    final = out_dir.expanduser().resolve()
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "plots").mkdir(parents=True)
    sections = []
    for split, e in evaluation.items():
        images = plots_for(split, e, model, dataset.manifest["receivers"], staging / "plots")
        sections.append((f"{split} split ({e['count']:,} captures)", table(e["rows"]), receivers_table(e),
                         [p.relative_to(staging).as_posix() for p in images]))
    title = f"Evaluation of {model.label}"
    facts = [f"model: {model.label} ({model.kind}{', ' + json.dumps(model.info) if model.info else ''})",
             f"data: {dataset.uri} (manifest {dataset.manifest_sha256[:12]}, {dataset.manifest.get('source', '?')})",
             f"ideal coverage: 1σ {IDEAL_COVERAGE['cov1']:.3f}, 2σ {IDEAL_COVERAGE['cov2']:.3f}; "
             "errors are haversine metres; centroid = always predicting the training area's centre"]
    if fmt == "html":
        body = "".join(f"<h2>{html.escape(h)}</h2>{_html(t)}<h3>by number of active receivers</h3>{_html(r)}"
                       + "".join(f'<img src="{i}" style="max-width:48%">' for i in imgs) for h, t, r, imgs in sections)
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
               "body{font-family:sans-serif;margin:2em} td,th{padding:2px 10px;text-align:right} "
               "td:first-child{text-align:left} table{border-collapse:collapse} tr:nth-child(even){background:#f4f4f4}"
               f"</style></head><body><h1>{html.escape(title)}</h1>"
               + "".join(f"<p>{html.escape(f)}</p>" for f in facts) + body + "</body></html>")
    else:
        doc = "\n\n".join([f"# {title}", "\n".join(f"- {f}" for f in facts)] + [
            f"## {h}\n\n{_md(t)}\n\n### by number of active receivers\n\n{_md(r)}\n\n"
            + "\n".join(f"![{Path(i).stem}]({i})" for i in imgs) for h, t, r, imgs in sections]) + "\n"
    (staging / f"report.{fmt}").write_text(doc)
    (staging / "metrics.json").write_text(json.dumps({"model": model.label, "kind": model.kind, "info": model.info,
                                                      "data": dataset.uri, "manifest_sha256": dataset.manifest_sha256,
                                                      "splits": metrics_json(evaluation)}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    return final / f"report.{fmt}"


def log_to_mlflow(evaluation: dict, model, dataset, report: Path, tracking_uri: str, experiment: str) -> str:
    """One MLflow run per evaluation: metrics {split}_{metric} (and the baseline's), the report folder.
    Through a client, not mlflow's global active experiment: that would leak into later calls."""
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from heimdall.tracking import check_reachable

    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    run = client.create_run(found.experiment_id if found else client.create_experiment(experiment),
                            run_name=f"evaluate {model.label}", tags={"heimdall.kind": "evaluate"})
    params = {"model": model.label, "model_kind": model.kind, "data": dataset.uri,
              "data_manifest_sha256": dataset.manifest_sha256, **{f"model_{k}": v for k, v in model.info.items()}}
    metrics = {}
    for split, e in evaluation.items():
        metrics.update({f"{split}_{k}": v for k, v in e["rows"]["model"].items()})
        if "physics baseline" in e["rows"]:
            metrics.update({f"{split}_baseline_{k}": v for k, v in e["rows"]["physics baseline"].items()})
        metrics.update({f"{split}_p68_m_active_{k}": rows["model"]["p68_m"] for k, rows in e["by_receivers"].items()})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifacts(run.info.run_id, str(report.parent), "evaluation")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
