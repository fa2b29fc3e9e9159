"""The reference for bench/startup.py, in the shape of Ray's Lightning example: a bare TorchTrainer
(1 worker) whose train function builds the same LightningModule and a Lightning Trainer over the
same Ray Data shards, and prints when its first training step is done. Nothing of heimdall's
launcher: no config checks, run record, MLflow, normalisation fit or checkpoints.

Usage: python bench/bare_trainer.py DATASET STORAGE_PATH
"""
import sys
import time

import ray
from ray.train import DataConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    import lightning as L

    from heimdall.config import ModelConfig, OptimConfig
    from heimdall.data.dataset import Dataset
    from heimdall.training.batch import to_inputs
    from heimdall.training.module import LocalizationModule

    class FirstStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                print(f"HEIMDALL_FIRST_STEP {time.time():.3f}", flush=True)
                trainer.should_stop = True

    dataset = Dataset.open(config["data"])

    def batches(split):  # IQ is fixed-width binary in Arrow: the dataset decodes it (a zero-copy view)
        for table in ray.train.get_dataset_shard(split).iter_batches(batch_size=64, batch_format="pyarrow"):
            yield to_inputs(dataset.decode(table, split, split), 45.0, 7.5)

    module = LocalizationModule(ModelConfig(size="tiny").model_dump(), OptimConfig().model_dump(), total_steps=100)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[FirstStep()])
    trainer.fit(module, batches("train"), batches("val"))


if __name__ == "__main__":
    from heimdall.data.dataset import Dataset
    from launch.ingest import train_val_datasets

    ray.init(address="local", include_dashboard=True)
    TorchTrainer(loop, train_loop_config={"data": sys.argv[1]}, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 datasets=train_val_datasets(Dataset.open(sys.argv[1]), 0, 1.0),
                 dataset_config=DataConfig(datasets_to_split=["train", "val"]),
                 run_config=ray.train.RunConfig(name=f"bare-{time.time():.0f}", storage_path=sys.argv[2])).fit()
