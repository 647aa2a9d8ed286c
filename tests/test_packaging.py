"""What diffplat declares against what it imports, and commands whose optional part is missing.

The missing parts are simulated by blocking their modules in the command's process
(`sys.modules[name] = None`, which `import` and `find_spec` both honour): a venv without the
extras would show the same, at the cost of a second multi-GB install per test run.
"""

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from diffplat.extras import EXTRAS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "diffplat"

# Declared, needed at run time, and never imported by diffplat itself, each for a reason.
NOT_IMPORTED = {
    "sqlalchemy": "MLflow's client needs it for a local sqlite: store (a job's default)",
    "alembic": "likewise, to create and migrate that store",
    "mlflow": "tracking-server: `diffplat mlflow` runs its `mlflow server` as a process",
}
# Imported where present, never required: the code says what it does without them.
UNDECLARED = {"bitsandbytes": "train.use_8bit_adam on a GPU; AdamW (with a warning) without it"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return {_name(r) for r in project["dependencies"]}, extras


def _imported() -> dict[str, set[str]]:
    """Top-level third-party module -> the diffplat files importing it."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "diffplat" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(PACKAGE)))
    return found


def test_every_import_is_declared_and_every_declaration_used():
    core, extras = _declared()
    runtime = core | set().union(*(v for k, v in extras.items() if k not in ("test", "all")))
    dists = packages_distributions()
    imported_dists = set()
    for module, files in _imported().items():
        if module in UNDECLARED:
            continue
        owners = {_name(d) for d in dists.get(module, [])}
        assert owners, f"{module} (imported by {sorted(files)}) belongs to no installed distribution"
        assert owners & runtime, f"{module} (imported by {sorted(files)}) comes from {owners}: not declared in pyproject"
        imported_dists |= owners & runtime
    unused = runtime - imported_dists - set(NOT_IMPORTED)
    assert not unused, f"declared in pyproject but never imported: {sorted(unused)}"
    # each extra's probe modules (what diffplat.extras looks for) are the extra's own
    assert set(EXTRAS) == set(extras) - {"test", "all"}
    assert extras["all"] == {"diffplat"}


def test_optional_packages_are_imported_only_where_used():
    """The core's modules import no optional package at import time: a core install imports them."""
    core, _ = _declared()
    dists = packages_distributions()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only; functions import lazily
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    owners = {_name(d) for d in dists.get(top, [])}
                    optional = owners and not owners & core and top != "diffplat"
                    if optional and top not in sys.stdlib_module_names:
                        rel = path.relative_to(PACKAGE).as_posix()
                        assert rel.startswith("serving/") or rel == "mlflow_model.py", \
                            f"{rel} imports {name} at module level; it is an optional extra's"


BLOCK = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed
from diffplat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _diffplat_without(blocked: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


ALL_OPTIONAL = [m for modules in EXTRAS.values() for m in modules]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["run", "jobs/bdd_lora_sdxl.yaml"], "this job (train) needs diffplat's optional deepspeed (deepspeed is not installed): pip install 'diffplat[deepspeed]'"),
        (["run", "jobs/bdd_generate_filter.yaml"], "this job (filter) needs diffplat's optional detect (ultralytics is not installed): pip install 'diffplat[detect]'"),
        (["run", "jobs/bdd_evaluate.yaml"], "this job (evaluate) needs diffplat's optional detect (ultralytics is not installed)"),
        (["serve"], "diffplat serve needs diffplat's optional serve (fastapi is not installed): pip install 'diffplat[serve]'"),
        (["mlflow"], "diffplat mlflow needs diffplat's optional tracking-server (flask is not installed): pip install 'diffplat[tracking-server]'"),
        (["demo", "--output", "never-made"], "pip install 'diffplat[deepspeed,serve,detect,tracking-server]'"),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_naming_what_to_install(tmp_path, args, names):
    proc = _diffplat_without(ALL_OPTIONAL, *args, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert names in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no traceback
    assert not (REPO / "never-made").exists()


def test_the_core_works_without_any_extra(tmp_path):
    """A core install writes a model and reads a job, with every optional package absent."""
    proc = _diffplat_without(ALL_OPTIONAL, "tiny-model", str(tmp_path / "tiny"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    proc = _diffplat_without(ALL_OPTIONAL, "check", str(REPO / "jobs" / "bdd_lora_sdxl.yaml"), cwd=tmp_path)
    assert proc.returncode == 0 and "train:" in proc.stdout, proc.stderr[-2000:]
