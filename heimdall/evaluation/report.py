"""The evaluation report of `heimdall evaluate`: tables per split and per number of receivers
that hear, beside the physics baseline and the centroid, the error CDF and a prediction map, as
Markdown or HTML, plus metrics.json. Written to a temp folder and renamed: a report folder that
exists is complete."""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path


from heimdall.evaluation.metrics import IDEAL_COVERAGE, SplitReport
from heimdall.geodesy import ellipse_outline


def metrics_json(evaluation: dict) -> dict:
    return {split: {**e["report"].to_json(),
                    "by_active_receivers": {str(k): r.to_json() for k, r in e["by_receivers"].items()}}
            for split, e in evaluation.items()}


def receivers_table(e: dict) -> list[list[str]]:
    by: dict[int, SplitReport] = e["by_receivers"]
    others = [row for row in ("reference", "physics baseline", "centroid") if row in e["report"]]
    head = ["receivers heard", "captures", "model P50 m", "model P68 m"] + [f"{row} P68 m" for row in others]
    body = [[str(k), f"{r.count:,}", f"{r.model.p50_m:,.0f}", f"{r.model.p68_m:,.0f}"]
            + [f"{r[row].p68_m:,.0f}" if row in r else "-" for row in others] for k, r in by.items()]
    return [head] + body


def _md(t: list[list[str]]) -> str:
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in t[1:]])


def _html(t: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def plots_for(split: str, pred: dict, model, receivers: list[dict], folder: Path, ellipses: int = 25) -> list[Path]:
    """The error CDF of every row and a map of predictions with their ellipses."""
    from heimdall.evaluation import plots
    from heimdall.evaluation.evaluate import row_errors

    out, truth = pred["model"], pred["truth"]
    n = min(300, len(out["latitude"]))
    outlines = [ellipse_outline(*out["east_north_m"][i].astype(float), *out["ellipse_semi_axes_m"][i].astype(float),
                                float(out["ellipse_orientation_deg"][i]), model.ref_lat, model.ref_lon)
                for i in range(min(ellipses, n))]
    return [plots.error_cdf(row_errors(pred, "model", model.ref_lat, model.ref_lon), folder / f"{split}_error_cdf.png"),
            plots.serving_map(out["latitude"][:n], out["longitude"][:n], outlines, truth["tx_lat"][:n],
                              truth["tx_lon"][:n], receivers, folder / f"{split}_map.png",
                              f"{split}: {n} captures, {len(outlines)} ellipses")]


def write_report(evaluation: dict, model, dataset, out_dir: Path, fmt: str = "md") -> Path:
    final = out_dir.expanduser().resolve()
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "plots").mkdir(parents=True)
    sections = []
    for split, e in evaluation.items():
        images = plots_for(split, e["pred"], model, dataset.manifest["receivers"], staging / "plots")
        sections.append((f"{split} split ({e['report'].count:,} captures)", e["report"].cells(), receivers_table(e),
                         [p.relative_to(staging).as_posix() for p in images]))
    title = f"Evaluation of {model.label}"
    facts = [f"model: {model.label} ({model.kind}{', ' + json.dumps(model.info) if model.info else ''})",
             f"data: {dataset.uri} (manifest {dataset.manifest_sha256[:12]}, {dataset.manifest.get('source', '?')})",
             f"ideal coverage: 1σ {IDEAL_COVERAGE['cov1']:.3f}, 2σ {IDEAL_COVERAGE['cov2']:.3f}; "
             "errors are haversine metres; reference = the world-aware estimator (synthetic data, docs/reference.md); "
             "centroid = always predicting the training area's centre"]
    if fmt == "html":
        body = "".join(f"<h2>{html.escape(h)}</h2>{_html(t)}<h3>by number of receivers that hear</h3>{_html(r)}"
                       + "".join(f'<img src="{i}" style="max-width:48%">' for i in imgs) for h, t, r, imgs in sections)
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
               "body{font-family:sans-serif;margin:2em} td,th{padding:2px 10px;text-align:right} "
               "td:first-child{text-align:left} table{border-collapse:collapse} tr:nth-child(even){background:#f4f4f4}"
               f"</style></head><body><h1>{html.escape(title)}</h1>"
               + "".join(f"<p>{html.escape(f)}</p>" for f in facts) + body + "</body></html>")
    else:
        doc = "\n\n".join([f"# {title}", "\n".join(f"- {f}" for f in facts)] + [
            f"## {h}\n\n{_md(t)}\n\n### by number of receivers that hear\n\n{_md(r)}\n\n"
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

    from heimdall.tracking import check_reachable, experiment_id

    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, experiment),
                            run_name=f"evaluate {model.label}", tags={"heimdall.kind": "evaluate", "heimdall.producer": model.producer})
    params = {"model": model.label, "model_kind": model.kind, "data": dataset.uri,
              "data_manifest_sha256": dataset.manifest_sha256, **{f"model_{k}": v for k, v in model.info.items()}}
    metrics = {}
    for split, e in evaluation.items():
        metrics.update(e["report"].named())
        metrics.update({f"{split}_p68_m_active_{k}": r.model.p68_m for k, r in e["by_receivers"].items()})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifacts(run.info.run_id, str(report.parent), "evaluation")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
