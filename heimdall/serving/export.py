"""Checkpoint -> one ONNX graph (heimdall.serving.graph.ServingModel), and the proof that ONNX Runtime
computes what PyTorch computes: on every held-out sample and on fresh random inputs (random
receiver subsets and orders, batch 1 and odd sizes, random IQ)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from heimdall.data import states
from heimdall.data.states import ABSENT, HEARD
from heimdall.geodesy import haversine_m
from heimdall.model.net import LocalizationNet
from heimdall.serving.graph import INPUTS, OUTPUTS, ServingModel

DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Export or validation failed; nothing may be uploaded or registered."""


Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_sha256(net: LocalizationNet) -> str:
    """Identity of the trained model (weights and frame), independent of the export."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def example_inputs(num_receivers: int, iq_length: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    iq = torch.randint(-2000, 2000, (batch, num_receivers, 2, iq_length), dtype=torch.int16, generator=g)
    rx_pos = torch.tensor([45.0, 7.5, 300.0], dtype=torch.float64).expand(batch, num_receivers, 3).clone()
    return iq, rx_pos, torch.full((batch, num_receivers), HEARD, dtype=torch.int8)


def export_graph(net: LocalizationNet, num_receivers: int, iq_length: int, opset: int = DEFAULT_OPSET):
    """The serving graph as an onnx.ModelProto: dynamic batch and receiver count, fixed IQ length."""
    from torch.export import Dim

    serving = ServingModel(copy.deepcopy(net).cpu().float()).eval()
    batch, receivers = Dim("batch", min=1), Dim("receivers", min=1)
    dims = {0: batch, 1: receivers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # optimize=False: the onnxscript optimizer folds `x + 1e-12` away as if the constant were 0,
        # so a silent receiver's log power becomes -inf and NaN spreads (caught by the parity check
        # here). ONNX Runtime optimises the graph itself when it loads it.
        program = torch.onnx.export(serving, example_inputs(num_receivers, iq_length), dynamo=True,
                                    external_data=False, optimize=False, opset_version=opset,
                                    input_names=list(INPUTS), output_names=list(OUTPUTS),
                                    dynamic_shapes=(dims, dims, dims), verbose=False)
    return program.model_proto


def with_metadata(proto, metadata: dict[str, str]):
    """Attach metadata_props (string key -> string value); returns the same proto."""
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    proto.producer_name = "heimdall"
    return proto


def check_graph(proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from None


def metadata_of(data: bytes) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


class OnnxPredictor:
    """An ONNX Runtime CPU session over the serving graph."""

    def __init__(self, data: bytes | str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if isinstance(data, (str, Path)):
            data = Path(data).read_bytes()
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.metadata = self.session.get_modelmeta().custom_metadata_map

        # Exports made before receiver states existed take a two-state `mask` (True = heard); to them
        # a silent receiver is absent, which is what they were trained on.
        self.two_state = "mask" in {i.name for i in self.session.get_inputs()}

    def __call__(self, iq, rx_pos, rx_state) -> dict[str, np.ndarray]:
        feeds = {"iq": np.ascontiguousarray(iq, dtype=np.int16), "rx_pos": np.ascontiguousarray(rx_pos, dtype=np.float64)}
        rx_state = states.check(rx_state)
        if self.two_state:
            feeds["mask"] = np.asarray(rx_state) == HEARD
        else:
            feeds["rx_state"] = np.ascontiguousarray(rx_state, dtype=np.int8)
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), feeds)))


class TorchPredictor:
    """The same serving graph in PyTorch eager: the reference ONNX is held to."""

    def __init__(self, net: LocalizationNet, device: str = "cpu"):
        self.model, self.device = ServingModel(net).eval().to(device), device

    @torch.no_grad()
    def __call__(self, iq, rx_pos, rx_state) -> dict[str, np.ndarray]:
        t = [torch.from_numpy(np.array(a)).to(self.device) for a in (iq, rx_pos, states.check(rx_state))]  # a copy: inputs may be read-only
        return {k: v.cpu().numpy() for k, v in zip(OUTPUTS, self.model(*t))}


# ---- parity ------------------------------------------------------------------------------------
@dataclass
class Parity:
    """Largest ONNX-vs-PyTorch differences over one group of inputs."""
    case: str
    samples: int
    east_north_m: float
    lat_lon_m: float
    semi_axes_rel: float
    covariance_rel: float  # relative Frobenius difference of the covariance: catches orientation too
    position_sigma: float  # position difference over the estimate's smaller semi-axis

    def failures(self, tolerance_m: float, rtol: float) -> list[str]:
        # float32 in another runtime moves a position far from the origin by metres; what must hold
        # is that it moves it by far less than the model's own uncertainty.
        limit = f"limit {tolerance_m:g} m, or {rtol:g} of the smaller semi-axis"
        out = []
        if not (self.east_north_m < tolerance_m or self.position_sigma < rtol):
            out.append(f"east/north differs by {self.east_north_m:.3g} m ({limit})")
        if not (self.lat_lon_m < tolerance_m or self.position_sigma < rtol):
            out.append(f"lat/lon differs by {self.lat_lon_m:.3g} m ({limit})")
        if not self.semi_axes_rel < rtol:
            out.append(f"ellipse semi-axes differ by {self.semi_axes_rel:.3g} relative (limit {rtol:g})")
        if not self.covariance_rel < rtol:
            out.append(f"ellipse (covariance) differs by {self.covariance_rel:.3g} relative (limit {rtol:g})")
        return [f"{self.case}: {f}" for f in out]


def covariance(axes: np.ndarray, orientation_deg: np.ndarray) -> np.ndarray:
    """1-sigma semi-axes and bearing of the major axis -> east/north covariance (N, 2, 2)."""
    t = np.radians(orientation_deg.astype(np.float64))
    u = np.stack([np.sin(t), np.cos(t)], -1)  # major axis direction in east/north
    v = np.stack([np.cos(t), -np.sin(t)], -1)
    a2, b2 = (axes[:, 0].astype(np.float64) ** 2)[:, None, None], (axes[:, 1].astype(np.float64) ** 2)[:, None, None]
    return a2 * u[:, :, None] * u[:, None, :] + b2 * v[:, :, None] * v[:, None, :]


def compare(case: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> Parity:
    def worst(x: np.ndarray) -> float:
        return float(np.nanmax(x)) if np.isfinite(x).all() else float("inf")  # NaN anywhere is a failure

    en = np.abs(ref["east_north_m"].astype(np.float64) - got["east_north_m"]).max(-1)
    ll = haversine_m(ref["latitude"], ref["longitude"], got["latitude"], got["longitude"])
    axes = np.abs(got["ellipse_semi_axes_m"] - ref["ellipse_semi_axes_m"]) / np.abs(ref["ellipse_semi_axes_m"])
    c_ref = covariance(ref["ellipse_semi_axes_m"], ref["ellipse_orientation_deg"])
    c_got = covariance(got["ellipse_semi_axes_m"], got["ellipse_orientation_deg"])
    cov = np.linalg.norm(c_got - c_ref, axis=(1, 2)) / np.linalg.norm(c_ref, axis=(1, 2))
    sigma = np.maximum(en, ll) / ref["ellipse_semi_axes_m"].min(-1)
    return Parity(case, len(en), worst(en), worst(ll), worst(axes), worst(cov), worst(sigma))


def random_cases(pool: dict[str, np.ndarray], seed: int, batches: int) -> Iterator[tuple[str, tuple]]:
    """Inputs a receiver network might send: held-out captures with random receiver subsets in
    random order, batch 1 and odd sizes; and random IQ at random positions."""
    rng = np.random.default_rng(seed)
    n, R = pool["rx_state"].shape
    sizes = [1, 3, 7, 1, 5, 2, 9, 4]
    for i in range(batches):
        b = sizes[i % len(sizes)]
        rows = rng.choice(n, size=b, replace=b > n)
        k = int(rng.integers(1, R + 1))
        rx = rng.permutation(R)[:k]
        state = np.where(rng.random((b, k)) > 0.2, pool["rx_state"][rows][:, rx], ABSENT).astype(np.int8)
        state[np.arange(b), rng.integers(0, k, b)] = HEARD  # at least one receiver hears
        yield f"subset b={b} r={k}", (pool["iq"][rows][:, rx], pool["rx_pos"][rows][:, rx], state)
    for b in (1, 6):
        k = int(rng.integers(1, R + 1))
        L = pool["iq"].shape[-1]
        amplitude = rng.choice([30, 300, 3000, 30000], size=(b, k, 1, 1))
        iq = np.clip(rng.normal(size=(b, k, 2, L)) * amplitude, -32768, 32767).astype(np.int16)
        centre = pool["rx_pos"].reshape(-1, 3).mean(0)
        rx_pos = centre + rng.normal(size=(b, k, 3)) * [0.5, 0.5, 300.0]
        state = rng.integers(ABSENT, HEARD + 1, size=(b, k)).astype(np.int8)
        state[:, 0] = HEARD
        yield f"random IQ b={b} r={k}", (iq, rx_pos, state)


def check_parity(reference: Predictor, candidate: Predictor, held_out: tuple[dict, dict] | None,
                 pool: dict[str, np.ndarray], tolerance_m: float, rtol: float, seed: int = 0,
                 random_batches: int = 8) -> list[Parity]:
    """Compare the held-out outputs (reference's, candidate's) and each random case; raises
    ExportError listing every case outside tolerance."""
    rows = [compare("held-out test split", *held_out)] if held_out else []
    for case, inputs in random_cases(pool, seed, random_batches):
        rows.append(compare(case, reference(*inputs), candidate(*inputs)))
    failures = [f for p in rows for f in p.failures(tolerance_m, rtol)]
    if failures:
        raise ExportError("ONNX Runtime does not reproduce PyTorch:\n  " + "\n  ".join(failures)
                          + "\n" + format_parity(rows))
    return rows


def format_parity(rows: list[Parity]) -> str:
    lines = [f"{'ONNX vs PyTorch':<26}{'samples':>8}{'east/north m':>14}{'lat/lon m':>12}{'axes rel':>11}{'cov rel':>11}{'pos / axis':>12}"]
    for p in rows:
        lines.append(f"{p.case:<26}{p.samples:>8}{p.east_north_m:>14.2e}{p.lat_lon_m:>12.2e}"
                     f"{p.semi_axes_rel:>11.1e}{p.covariance_rel:>11.1e}{p.position_sigma:>12.1e}")
    return "\n".join(lines)


def parity_dicts(rows: list[Parity]) -> list[dict]:
    return [asdict(p) for p in rows]
