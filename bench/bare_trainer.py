"""The reference for bench/startup.py: a minimal bare TorchTrainer (1 worker, the same tiny model,
one batch read straight from a shard), printing when its first training step is done."""
import sys
import time

import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    import torch

    from heimdall.training.batch import INPUT_COLUMNS, to_inputs
    from heimdall.data.dataset import Dataset
    from heimdall.model.loss import gaussian_nll
    from heimdall.config import ModelConfig
    from heimdall.model.net import build_model

    torch.set_num_threads(1)
    ds = Dataset.open(config["data"])
    cols = next(ds.iter_shards("train", columns=INPUT_COLUMNS))
    b = to_inputs({k: v[:64] for k, v in cols.items()}, 45.0, 7.5)
    model = build_model(ModelConfig(size="tiny"))
    opt = torch.optim.AdamW(model.parameters())
    mean, tril = model(b["iq"], b["rx_pos"], b["rx_state"])
    gaussian_nll(b["target"], mean, tril).mean().backward()
    opt.step()
    print(f"HEIMDALL_FIRST_STEP {time.time():.3f}", flush=True)


if __name__ == "__main__":
    ray.init(address="local", include_dashboard=True)
    TorchTrainer(loop, train_loop_config={"data": sys.argv[1]},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"bare-{time.time():.0f}", storage_path=sys.argv[2])).fit()
