"""The lean GPU image on a full environment (bench/gpu_check.sh's CPU smoke mode).

With this folder on PYTHONPATH, every Python process (Ray's workers too) sees the packages that
image lacks as absent: imports fail, `importlib.util.find_spec` returns None and their
distribution metadata is gone (libraries such as torchmetrics decide from it). With
HEIMDALL_BLOCK_LOG set, each process appends an `active` line and one `absent` line per lookup
with the file that asked, so a guarded optional import shows up as well as a failing one.
"""
import os
import sys
import traceback
from importlib.machinery import PathFinder

# Not on the GPU image: these, and ray[default]'s dashboard extras (without aiohttp_cors Ray sees a minimal install).
BLOCKED = {"mlflow", "boto3", "botocore", "matplotlib", "moto", "onnxscript", "optuna",
           "aiohttp_cors", "colorful", "opencensus", "opentelemetry", "smart_open", "virtualenv", "py_spy"}
LOG = os.environ.get("HEIMDALL_BLOCK_LOG")
_find_spec, _find_distributions = PathFinder.find_spec, PathFinder.find_distributions


def _log(line: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()} {line}\n")


def _blocked_dist(name: str) -> bool:
    name = name.lower().replace("-", "_").replace(".", "_")
    return name in BLOCKED or name.startswith(tuple(b + "_" for b in BLOCKED))


def find_spec(fullname, path=None, target=None):
    if fullname.partition(".")[0] in BLOCKED:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "importlib" not in f.filename and not f.filename.startswith("<") and f.filename != __file__]
        where = f" asked by {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        _log(f"absent {fullname}{where}")
        return None
    return _find_spec(fullname, path, target)


def find_distributions(*args, **kwargs):
    for d in _find_distributions(*args, **kwargs):
        if not _blocked_dist(getattr(d, "_normalized_name", None) or d.metadata["Name"] or ""):
            yield d


PathFinder.find_spec = staticmethod(find_spec)
PathFinder.find_distributions = staticmethod(find_distributions)
_log("active " + " ".join(getattr(sys, "argv", []))[:200])
