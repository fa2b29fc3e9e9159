import csv
import json
import subprocess
import sys

import pytest

from helpers import QUICK_CONFIG, cli


def test_help_lists_commands_without_loading_ray_or_torch():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("data synth", "fit", "train"):
        assert command in out.stdout
    probe = "import sys, launch.cli; print(sorted(m for m in ('ray', 'torch', 'lightning') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_bad_world_parameter_is_a_clear_error(tmp_path):
    out = cli("data", "synth", "--out", str(tmp_path / "d"), "--samples", "10", "--world", "terain_std_db=3")
    assert out.returncode == 2
    assert "terain_std_db" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "d").exists()


def test_fit_with_unknown_key_fails_before_training(tmp_path):
    out = cli("fit", "data.uri=" + str(tmp_path), "optim.lrr=1")
    assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr


def test_fit_on_missing_dataset_is_a_clear_error(tmp_path):
    out = cli("fit", f"data.uri={tmp_path / 'nothing'}")
    assert out.returncode == 2 and "no manifest.json" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_synth_then_fit_beats_the_centroid_and_resumes(tmp_path):
    """The CI gate: synthesise a low-noise world, fit `tiny` on CPU, beat the centroid by 2x."""
    data, runs = tmp_path / "data", tmp_path / "run"
    synth = cli("data", "synth", "--out", str(data), "--samples", "8000", "--iq-length", "256",
                "--world-preset", "low-noise", "--workers", "2", "--seed", "1")
    assert synth.returncode == 0, synth.stderr
    assert synth.stdout.count("share one site") == 1
    args = ["fit", "--config", QUICK_CONFIG, f"data.uri={data}", f"trainer.out_dir={runs}"]
    first = cli(*args, "trainer.max_epochs=8")
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((runs / "test_metrics.json").read_text())["rows"]
    model, centroid = table["model"], table["centroid"]
    print(first.stdout[-1500:])
    assert model["p68_m"] <= 0.5 * centroid["p68_m"], table
    assert "physics baseline" in first.stdout and "epoch 8/8" in first.stdout
    assert 0.15 < model["cov1"] < 0.65 and 0.6 < model["cov2"] < 0.98  # uncertainty is meaningful
    # Same out_dir, two more epochs (a changed config: --resume): continues from the last checkpoint.
    second = cli("fit", "--resume", *args[1:], "trainer.max_epochs=10", "trainer.patience=10")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout
    assert "epoch 9/10" in second.stdout and "epoch 1/10" not in second.stdout
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(runs / "metrics.csv"))]
    assert epochs == list(range(len(epochs))) and epochs[-1] >= 8  # one curve, each epoch once (early stop may end it)
    for png in ("training_curves.png", "test_error_cdf.png", "test_map.png"):
        assert (runs / "plots" / png).read_bytes()[:4] == b"\x89PNG"
