import boto3
import numpy as np

from heimdall.data.dataset import Dataset
from heimdall.data.synth import SynthSpec, synthesize


def test_synth_to_s3_and_stream_back(s3_server, small_dataset):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="datasets")
    uri = "s3://datasets/heimdall/small"
    manifest = synthesize(SynthSpec(out=uri, samples=600, seed=3, iq_length=256, shard_size=256),
                          workers=2, log=lambda *_: None)
    local = Dataset.open(small_dataset)
    assert manifest["shards"] == local.manifest["shards"]  # same bytes as the local copy
    remote = Dataset.open(uri)
    a = next(remote.iter_shards("val"))
    b = next(local.iter_shards("val"))
    assert np.array_equal(a["iq"], b["iq"]) and np.array_equal(a["sample_id"], b["sample_id"])
