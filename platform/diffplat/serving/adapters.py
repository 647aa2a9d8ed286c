"""Adapters on demand: a request names one, a replica loads it on first use and keeps a bounded
number loaded on its one base pipeline (least recently used evicted), so many adapters share one
base model without a redeploy.

Names are the sub-folders of the registry folder (each holding `pytorch_lora_weights.safetensors`,
or ai-toolkit's `<folder name>.safetensors`) whose adapter_info.json names the base model's family
(or no family: made elsewhere), or an adapter in MLflow: `runs:/<run id>/<artifact path>`,
`models:/<name>/<version>`, `models:/<name>@<alias>` (fetched once per replica and version; an
alias is looked up on each use, so moving it moves the API to the new version).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

from diffplat.models.lora import adapter_info, weights_name
from diffplat.tracking import fetch_adapter, is_mlflow_ref, pinned_ref

log = logging.getLogger("diffplat")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownAdapter(ValueError):
    pass


_DOWNLOADS = "diffplat-adapters-"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def download_folder() -> Path:
    """A new folder for one replica's adapters fetched from MLflow: <tmp>/diffplat-adapters-<pid>-*.
    Ray stops a replica's process with SIGKILL, which leaves its folder (adapter weights) behind; so
    a new one first removes this user's folders whose process is gone."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{_DOWNLOADS}*-*"):
        pid = old.name.removeprefix(_DOWNLOADS).split("-", 1)[0]
        if (pid.isdigit() and _gone(int(pid)) and not old.is_symlink() and old.is_dir()
                and old.stat().st_uid == os.getuid()):  # fmt: skip
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_DOWNLOADS}{os.getpid()}-"))


def registry_names(registry: str | None, family: str | None = None) -> list[str]:
    """The adapters a request may name: with `family`, those trained on it (or of no recorded family)."""
    if not registry or not Path(registry).is_dir():
        return []
    return sorted(p.name for p in Path(registry).iterdir()
                  if weights_name(p) and adapter_info(str(p)).get("family", family) == family)  # fmt: skip


def check_name(name: str, registry: str | None, family: str | None = None) -> None:
    """Refuse a name that is not in the registry (or not an MLflow reference), before any work.
    Names never become paths unchecked: no separators, no `..`."""
    if is_mlflow_ref(name):
        return
    if not _NAME.match(name) or ".." in name:
        raise UnknownAdapter(f"adapter {name!r} is not a registry name (letters, digits, . _ -), runs:/<id>/<path>, "
                             "models:/<name>/<version> or models:/<name>@<alias>")  # fmt: skip
    names = registry_names(registry, family)
    if name not in names:
        known = ", ".join(names) or "none"
        raise UnknownAdapter(f"no adapter {name!r} in the registry (known: {known})")


class AdapterCache:
    """LoRA adapters loaded into one pipeline, at most `capacity` at once."""

    def __init__(self, pipe, registry: str | None, capacity: int, tracking_uri: str | None = None):
        from diffplat.models.families import family_of_pipeline

        self.pipe, self.registry, self.capacity, self.tracking_uri = pipe, registry, capacity, tracking_uri
        self.family = family_of_pipeline(pipe).name
        self.loaded: OrderedDict[str, str] = OrderedDict()  # request name -> adapter name in the pipeline
        self.learnt: dict[str, str | None] = {}  # request name -> the prediction_type it was trained with
        self.loads = self.evictions = self._attempts = 0
        self._downloads: Path | None = None  # made on the first fetch from MLflow (download_folder)

    def _key(self, name: str) -> str:
        """What a loaded adapter is kept under: its name, with an MLflow alias resolved to the
        version it names now."""
        if not is_mlflow_ref(name):
            return name
        try:
            return pinned_ref(name, self.tracking_uri)
        except Exception as err:  # no such model or alias, the store unreachable
            raise UnknownAdapter(f"adapter {name!r}: MLflow does not resolve it ({type(err).__name__}: {err})") from None

    def _folder(self, key: str) -> Path:
        if is_mlflow_ref(key):
            if self._downloads is None:  # removed with the cache, at exit, or by the next replica after a kill
                self._downloads = download_folder()
                weakref.finalize(self, shutil.rmtree, self._downloads, True)
            try:
                return fetch_adapter(key, self._downloads, self.tracking_uri)
            except Exception as err:  # MLflow raises several types for a missing run, model or path
                raise UnknownAdapter(f"adapter {key!r}: cannot fetch it from MLflow ({err})") from None
        check_name(key, self.registry, self.family)
        return Path(self.registry) / key

    def ensure(self, name: str) -> str:
        """Load adapter `name` if it is not loaded (evicting the least recently used); its name
        in the pipeline. An adapter that cannot be fetched or does not fit the base model is an
        UnknownAdapter, and leaves nothing of itself in the pipeline."""
        return self._ensure(self._key(name))

    def _ensure(self, name: str) -> str:
        if name in self.loaded:
            return self.loaded[name]
        folder = self._folder(name)
        while len(self.loaded) >= self.capacity:
            old, internal = self.loaded.popitem(last=False)
            self.learnt.pop(old, None)
            self.pipe.delete_adapters(internal)
            self.evictions += 1
            log.info("serve: evicted adapter %s", old)
        self._attempts += 1
        internal = f"a{self._attempts}"  # a fresh name even after a failed load
        try:
            self.pipe.load_lora_weights(str(folder), weight_name=weights_name(folder), adapter_name=internal)
        except Exception as err:  # shapes or keys that do not fit this base model, a corrupt file
            try:
                self.pipe.delete_adapters(internal)  # whatever part of it was loaded
            except Exception:
                pass
            raise UnknownAdapter(f"adapter {name!r} does not load on this base model ({type(err).__name__}: "
                                 f"{str(err)[:300]})") from None  # fmt: skip
        self.loaded[name] = internal
        self.learnt[name] = adapter_info(str(folder)).get("prediction_type")
        self.loads += 1
        return internal

    def activate(self, name: str | None, scale: float = 1.0) -> str | None:
        """Make `name` the pipeline's only active adapter at `scale` (None: the base model).
        Returns the prediction_type it was trained with (v_prediction on an epsilon base), which
        the sampler must then use; None: the base's own."""
        if name is None:
            if self.loaded:
                self.pipe.disable_lora()
            return None
        key = self._key(name)
        internal = self._ensure(key)
        self.loaded.move_to_end(key)
        self.pipe.enable_lora()
        self.pipe.set_adapters([internal], adapter_weights=[scale])
        return self.learnt[key]

    def stats(self) -> dict:
        return {"loaded": list(self.loaded), "loads": self.loads, "evictions": self.evictions}
