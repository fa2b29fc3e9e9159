"""Pictures people would rather look at than read: training curves, error CDF, prediction map."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(rows: list[dict], out: Path) -> Path:
    """Rows of {'epoch': 0-based, metric: value} -> loss and validation errors per epoch."""
    def series(key):
        pts = [(float(r["epoch"]) + 1, float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return np.array(pts).T if pts else np.zeros((2, 0))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(*series("train_loss_epoch"), marker="o", label="train NLL")
    a.plot(*series("val_nll"), marker="o", label="val NLL")
    a.set_xlabel("epoch"), a.set_ylabel("NLL (nats, metres)"), a.legend()
    for key in ("val_p50_m", "val_p68_m", "val_p95_m"):
        e, v = series(key)
        b.plot(e, v / 1e3, marker="o", label=key)
    b.set_xlabel("epoch"), b.set_ylabel("error (km)"), b.legend()
    return _save(fig, out)


def error_cdf(errors: dict[str, np.ndarray], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in errors.items():
        ax.plot(np.sort(e) / 1e3, np.linspace(0, 1, len(e)), label=name)
    ax.axhline(0.68, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("haversine error (km)"), ax.set_ylabel("fraction of samples"), ax.legend()
    ax.set_title("error CDF")
    return _save(fig, out)


def sweep_curves(curves: dict[str, tuple[list, list]], metric: str, out: Path) -> Path:
    """Metric per epoch of every trial of a sweep (early-stopped trials end early)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial, (epochs, values) in curves.items():
        ax.plot(epochs, np.asarray(values) / (1e3 if metric.endswith("_m") else 1), marker=".", label=trial)
    ax.set_xlabel("epoch"), ax.set_ylabel(f"{metric} (km)" if metric.endswith("_m") else metric)
    ax.set_title(f"{len(curves)} trials"), ax.legend(fontsize=6, ncol=2)
    return _save(fig, out)


def param_vs_metric(rows: list[dict], params: list[str], metric: str, out: Path) -> Path:
    """One panel per searched parameter: its value against the trial's best metric."""
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(3.2 * max(1, len(params)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], params):
        xs = [r[key] for r in rows]
        ax.scatter(xs, [r["best"] / (1e3 if metric.endswith("_m") else 1) for r in rows], s=14)
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
    axes[0][0].set_ylabel(f"best {metric}" + (" (km)" if metric.endswith("_m") else ""))
    return _save(fig, out)


def trial_stops(rows: list[dict], rungs: list[int], max_epochs: int, out: Path) -> Path:
    """Which trial stopped where: one bar per trial (epochs trained, best first), the scheduler's rungs."""
    done = sorted((r for r in rows if r["best"] is not None), key=lambda r: r["best"])
    colour = {"completed": "tab:green", "stopped early": "tab:orange", "error": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.28 * max(1, len(done))))
    for i, r in enumerate(done):
        ax.barh(i, r["epochs"], color=colour.get(r["status"], "grey"), height=0.6)
        ax.text(r["epochs"] + 0.1, i, f"{r['best']:,.0f}", va="center", fontsize=7)
    for rung in rungs:
        ax.axvline(rung, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(done)), [r["trial"] for r in done], fontsize=6), ax.invert_yaxis()
    ax.set_xlim(0, max_epochs + 1.5), ax.set_xlabel("epochs trained (dashed: rungs)")
    ax.set_title("trials, best first: green ran to the end, orange stopped early")
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def serving_map(lat: np.ndarray, lon: np.ndarray, outlines: list, truth_lat: np.ndarray | None,
                truth_lon: np.ndarray | None, receivers: list[dict], out: Path, title: str) -> Path:
    """Predicted positions (with some 1-sigma ellipses as lat/lon rings) against the truth, receivers marked."""
    fig, ax = plt.subplots(figsize=(7, 6))
    if truth_lat is not None:
        for i in range(len(lat)):
            ax.plot([truth_lon[i], lon[i]], [truth_lat[i], lat[i]], color="grey", lw=0.4)
        ax.scatter(truth_lon, truth_lat, s=6, label="truth")
    ax.scatter(lon, lat, s=6, label="predicted")
    for i, (ring_lat, ring_lon) in enumerate(outlines):
        ax.plot(ring_lon, ring_lat, color="tab:orange", lw=0.6, label="1-sigma ellipse" if i == 0 else None)
    ax.scatter([r["longitude"] for r in receivers], [r["latitude"] for r in receivers], marker="^", s=60,
               color="black", label="receivers")
    ax.set_xlabel("longitude"), ax.set_ylabel("latitude"), ax.legend(fontsize=7), ax.set_title(title)
    ax.set_aspect(1 / np.cos(np.radians(np.mean(lat))))
    return _save(fig, out)
