#!/usr/bin/env bash
# Prepare Python wheels that the GPU machine lacks, small enough to travel with a `device` run.
#
# The GPU machine runs Python 3.12 with torch, lightning/pytorch-lightning, onnx, onnxruntime, numpy,
# pandas, pyarrow and fsspec already installed, but no ray. Ray's wheel is ~79 MB, over the 64 MiB that
# a run may carry, so this script drops ray/jars (Java support, unused here), which leaves ~47 MB.
# Verified: ray 2.60.0 stripped this way ran Ray Train + Lightning on one GPU.
#
# usage (on a machine with network, from the project root):  bench/gpu_wheels.sh [EXTRA_PACKAGE==VERSION ...]
# then copy the repository with .whl/ to the GPU machine and run  bench/gpu_check.sh  there: it installs
# .whl/*.whl into /tmp/site when the machine has no .venv.
# Extra packages travel too (their own missing dependencies must be named as well); keep .whl under 60 MB.
# Limits: these wheels give Ray Train, Ray Data and Ray Tune, but not Ray's dashboard/state API
# (ray[default]: aiohttp_cors, colorful, py-spy, opencensus, opentelemetry-*, smart_open, virtualenv
# and their dependencies). Without the state API, Tune sweeps over Train runs leak finished trials'
# placement groups and later trials wait forever, so on that machine run Train (or one trial at a
# time), or carry the default extras as well.
set -euo pipefail
RAY_VERSION=${RAY_VERSION:-$(python3 -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}
dest=.whl
mkdir -p "$dest"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$1" "$2" 2>&1 | grep -v "is ignored" || true
}
get "$tmp" "ray==$RAY_VERSION"
# Ray's own requirements that the GPU image lacks, plus ray[train,tune] extras it lacks.
for p in jsonschema jsonschema-specifications referencing rpds-py tensorboardX pydantic pydantic-core \
         annotated-types typing-inspection typing_extensions "$@"; do
  get "$dest" "$p"
done
python3 - "$tmp" "$dest" <<'EOF'
import os, sys, zipfile
src_dir, dest = sys.argv[1], sys.argv[2]
for name in os.listdir(src_dir):
    if not name.startswith("ray-"):
        continue
    zi = zipfile.ZipFile(os.path.join(src_dir, name))
    out = os.path.join(dest, name)
    with zipfile.ZipFile(out + ".part", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zo:
        for info in zi.infolist():
            if info.filename.startswith("ray/jars/"):
                continue
            data = zi.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if not l.startswith(b"ray/jars/"))
            zo.writestr(info, data)
    os.replace(out + ".part", out)
EOF
du -sh "$dest"
ls "$dest"
