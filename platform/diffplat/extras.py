"""diffplat's optional parts (pyproject's extras), and the one-line error when one is missing.

The core prepares, caches, generates, fills panels, exports adapters and tracks runs. Training
needs DeepSpeed, the HTTP API Ray Serve, the filter and evaluate stages ultralytics, the dashboard
MLflow's server. A command that needs a part that is not installed says so before anything
starts, naming the command and what to install, instead of an ImportError minutes into a run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from diffplat.config import ConfigError

# extra -> the modules it installs that diffplat imports (found without being imported: cheap)
EXTRAS: dict[str, tuple[str, ...]] = {
    "deepspeed": ("deepspeed",),
    "serve": ("fastapi", "starlette", "uvicorn", "psutil"),
    "detect": ("ultralytics", "matplotlib"),
    "tracking-server": ("flask",),  # MLflow's server; the core has only its client (mlflow-skinny)
}
STAGE_EXTRAS = {"train": "deepspeed", "filter": "detect", "evaluate": "detect"}


class MissingExtra(ConfigError):
    """A command needs an optional part of diffplat that is not installed."""


def _absent(extra: str) -> str | None:
    for module in EXTRAS[extra]:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):  # a parent package missing, or a module blocked
            return module
    return None


def require(extras: Iterable[str], what: str) -> None:
    """Raise MissingExtra naming `what` (e.g. "the train stage") and every extra it lacks."""
    lacking = {extra: module for extra in dict.fromkeys(extras) if (module := _absent(extra))}
    if lacking:
        names = ", ".join(f"{extra} ({module} is not installed)" for extra, module in lacking.items())
        raise MissingExtra(f"{what} needs diffplat's optional {names}: pip install 'diffplat[{','.join(lacking)}]'")


def require_for_stages(stages: Iterable[str]) -> None:
    needing = [stage for stage in stages if stage in STAGE_EXTRAS]
    if needing:
        require([STAGE_EXTRAS[stage] for stage in needing], f"this job ({', '.join(needing)})")
