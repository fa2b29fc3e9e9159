"""The layering rule: `heimdall/` is the library (no Ray, no launcher), `launch/` the launcher.
Config loading stays light (no torch), and a missing optional extra is one line naming it."""
import subprocess
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweep.yaml"


def python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_library_imports_neither_ray_nor_the_launcher():
    loaded = python("import importlib, pkgutil, sys, heimdall\n"
                    "names = [m.name for m in pkgutil.walk_packages(heimdall.__path__, 'heimdall.')]\n"
                    "[importlib.import_module(n) for n in names]\n"
                    "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'launch')))")
    count, leaked = loaded.split(" ", 1)
    assert int(count) >= 30 and leaked == "[]", loaded


def test_loading_a_config_imports_no_torch():
    assert python("import sys\nfrom heimdall.config import TuneConfig, load_config\n"
                  f"load_config({str(SWEEP)!r}, ['ray.num_workers=1-2'], TuneConfig)\n"
                  "print([m for m in ('torch', 'lightning', 'ray') if m in sys.modules])") == "[]"


def test_drivers_start_without_lightning():
    """Lightning takes seconds to import: only Ray Train workers (launch.worker) load it, not the
    driver, a sweep's trial drivers or Ray Train's controller (which unpickles launch.train's callback)."""
    assert python("import sys\nimport launch.cli, launch.train, launch.tune, launch.pipeline\n"
                  "print('lightning' in sys.modules)") == "False"


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    code = ("import sys\nsys.modules['ray'] = None  # as if the 'ray' extra were not installed\n"
            "from launch.cli import main\n"
            f"sys.exit(main(['train', 'data.uri={tmp_path}', 'mlflow.enabled=false']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("heimdall train: error: needs the 'ray' extra (ray is not installed): "
                                  "pip install 'heimdall[ray]'"), out.stderr


def test_the_serving_contract_page_is_generated_from_the_code():
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "contract_doc.py"),
                          "--check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
