import os

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small default-world dataset shared by the read-only tests."""
    from heimdall.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("data") / "small"
    synthesize(SynthSpec(out=str(out), samples=600, seed=3, iq_length=256, shard_size=256), log=lambda *_: None)
    return str(out)
