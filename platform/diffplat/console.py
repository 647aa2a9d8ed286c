"""What a user reads while a job runs: diffplat's own lines, the other libraries kept quiet.

Quiet means: Ray's own loggers, transformers, diffusers and DeepSpeed at ERROR, no library
progress bars, no Python warnings from outside diffplat, in this process and (through the job's
runtime env and Ray's logging config) in every Ray worker. Nothing is lost: Ray writes every
worker's full output to its session's log files (`<ray temp dir>/session_latest/logs`), and
`--verbose` (`ray.verbose: true`) shows it all here again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings

# Read by the libraries at import or at each call, in the driver and in every worker.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # tqdm's own switch: model loading and shard-writing bars
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_LOG_LEVEL": "ERROR",  # Ray Data configures its own loggers, in every process
}
TRAIN_LOG_LEVEL = {False: "WARNING", True: "INFO"}  # Ray Train's own (RunConfig.logging_config), by verbose
NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "deepspeed", "DeepSpeed", "transformers", "diffusers",
                 "torch.distributed", "torch.utils.cpp_extension", "alembic", "mlflow", "ultralytics", "urllib3")  # fmt: skip


def setup(verbose: bool = False) -> None:
    """diffplat's lines on stderr as `[diffplat] ...`; the other libraries quiet unless verbose."""
    log = logging.getLogger("diffplat")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[diffplat] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    from diffplat.train.deepspeed_config import select_accelerator

    select_accelerator()  # or DeepSpeed guesses, and warns that it did
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # In a Ray Train worker, what libraries print() reaches the root logger (Ray Train redirects
    # it), and Ray Train's report thread logs under its file's path, not under "ray.train".
    logging.getLogger().setLevel(logging.WARNING)
    context = sys.modules.get("ray.train.v2._internal.execution.context")  # loaded: a Ray Train worker
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"diffplat(\..*)?$")


def ray_init_options(verbose: bool) -> dict:
    """ray.init's options that carry the quiet settings to every worker of the job. Variables a
    submitted job already sets in its runtime env are left to it (Ray refuses a conflict)."""
    if verbose:
        return {"logging_level": logging.INFO}
    import ray

    env = {k: v for k, v in QUIET_ENV.items() if k not in os.environ or os.environ[k] == v}
    return {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR"),
            "runtime_env": {"env_vars": env}}  # fmt: skip


class Ticker:
    """When a long piece of work prints its progress line: every `seconds`, and at the end only
    when it took that long (short work says nothing until its summary line)."""

    def __init__(self, seconds: float = 10.0):
        self.start = self.last = time.perf_counter()
        self.seconds = seconds

    @property
    def long(self) -> bool:
        """This work has taken long enough to report its pieces as they end."""
        return time.perf_counter() - self.start >= self.seconds

    def due(self, last_one: bool = False) -> bool:
        now = time.perf_counter()
        if now - self.last >= self.seconds or (last_one and now - self.start >= self.seconds):
            self.last = now
            return True
        return False


@contextlib.contextmanager
def quiet_stdout(verbose: bool = False):
    """Swallow what a library prints (not logs) while it starts, e.g. DeepSpeed's 'op built
    successfully' on every worker."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
