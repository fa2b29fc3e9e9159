"""The LightningModule: Gaussian NLL training, metrics over the whole split, AdamW + warmup/cosine."""
from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import torch

from heimdall.model.loss import gaussian_nll, whiten
from heimdall.evaluation.metrics import errors_m, summarize
from heimdall.config import ModelConfig
from heimdall.model.net import build_model

# Split metrics are computed once from predictions gathered over all ranks: every rank logs the
# same value, so Lightning's advice to reduce them with sync_dist does not apply.
warnings.filterwarnings("ignore", message=".*sync_dist=True.*")


class LocalizationModule(L.LightningModule):
    def __init__(self, model: dict, optim: dict, total_steps: int, data: dict | None = None):
        """`data`: what the model was trained on (dataset.describe()); it travels in every checkpoint
        so an export knows the IQ length, sample rate and dataset without being told."""
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(ModelConfig(**model))
        self._outputs: list[dict[str, torch.Tensor]] = []

    @classmethod
    def restore(cls, path: str) -> "LocalizationModule":
        """A checkpoint's module on the CPU; one written before receiver states existed (no
        model.receiver_states) restores as the two-state model it is, one written before the silent
        sum (no model.silent_sum) without it."""
        saved = torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]["model"]
        return cls.load_from_checkpoint(path, map_location="cpu",
                                        model={"receiver_states": 2, "silent_sum": False, **saved})

    def forward(self, iq, rx_pos, rx_state):
        return self.model(iq, rx_pos, rx_state)

    def training_step(self, batch, batch_idx):
        mean, tril = self.model(batch["iq"], batch["rx_pos"], batch["rx_state"])
        loss = gaussian_nll(batch["target"], mean.float(), tril.float()).mean()
        # Per step: this rank's value (no collective per step); per epoch: the mean over all ranks.
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, batch_size=len(mean))
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, batch_size=len(mean), sync_dist=True)
        return loss

    def on_train_epoch_start(self):
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):  # heimdall.training.prefetch.DevicePrefetch: reseeds the shuffle
            loader.set_epoch(self.current_epoch)

    # ---- evaluation: collect every sample, gather across ranks, then compute metrics once ------
    def _collect(self, batch):
        mean, tril = self.model(batch["iq"], batch["rx_pos"], batch["rx_state"])
        mean, tril = mean.float(), tril.float()
        self._outputs.append({
            "mean": mean, "tril": tril.flatten(1), "target": batch["target"], "tx_latlon": batch["tx_latlon"],
            "nll": gaussian_nll(batch["target"], mean, tril),
            "whitened": whiten(batch["target"], mean, tril),
        })

    def validation_step(self, batch, batch_idx):
        self._collect(batch)

    def on_validation_epoch_end(self):
        self._log_split_metrics("val")

    def _log_split_metrics(self, split: str):
        # Every rank joins the gather, even one whose shard of the split was empty.
        outputs = self._outputs or [self._empty_outputs()]
        gathered = {k: self._gather(torch.cat([o[k] for o in outputs])).cpu().numpy() for k in outputs[0]}
        self._outputs.clear()
        if len(gathered["mean"]) == 0:
            return
        metrics = split_metrics(gathered, float(self.model.ref_lat), float(self.model.ref_lon), split)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name.endswith("p68_m"), sync_dist=False, rank_zero_only=False)

    def _empty_outputs(self) -> dict[str, torch.Tensor]:
        f32 = dict(dtype=torch.float32, device=self.device)
        return {"mean": torch.zeros(0, 2, **f32), "tril": torch.zeros(0, 4, **f32), "target": torch.zeros(0, 2, **f32),
                "tx_latlon": torch.zeros(0, 2, dtype=torch.float64, device=self.device),
                "nll": torch.zeros(0, **f32), "whitened": torch.zeros(0, 2, **f32)}

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All rows from every rank (ranks may hold different counts: pad, gather, trim)."""
        if self.trainer.world_size == 1:
            return x
        n = torch.tensor([len(x)], device=x.device)
        counts = self.all_gather(n).flatten().tolist()
        padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: len(x)] = x
        everything = self.all_gather(padded)
        return torch.cat([everything[r, :c] for r, c in enumerate(counts)])

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.hparams.optim
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=o["lr"])
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(o["warmup_steps"], self.hparams.total_steps, o["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(warmup: int, total: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def split_metrics(out: dict[str, np.ndarray], ref_lat: float, ref_lon: float, split: str) -> dict[str, float]:
    """Collected predictions of a split -> its metrics by name (val_p68_m, ...), computed once."""
    errors = errors_m(out["mean"], ref_lat, ref_lon, out["tx_latlon"][:, 0], out["tx_latlon"][:, 1])
    return summarize(errors, out["whitened"], out["nll"], split)
