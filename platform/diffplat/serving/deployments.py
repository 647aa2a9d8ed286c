"""The model deployments behind the HTTP API. Each loads its pipeline once per replica through
the same functions the bulk jobs use (models/loading.py, infer/), so one copy of the model code
serves both. Requests reach them already validated by the ingress (serving/app.py).

A replica fails only on its own faults. Each pipeline call runs in a worker thread, one at a
time (a lock), so the replica's event loop keeps answering health checks and stats during a long
generation. A request that fails (an adapter that cannot be fetched or does not fit, arguments
the pipeline refuses, out of memory) is answered `{"error": ...}` on its own (serving/errors.py)
and the replica serves on; only a device fault marks it broken, and its health check then fails
so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict

from ray import serve

from diffplat.config import ServeConfig
from diffplat.serving.errors import Refused, classify

log = logging.getLogger("diffplat")


def _rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


class _Replica:
    """What every model replica shares: settings, device, the pipeline lock, health, stats."""

    def __init__(self, settings: dict):
        import torch

        self.settings = ServeConfig.model_validate(settings)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.broken: str | None = None
        self.requests = self.refused = 0
        self.started = time.time()
        self._lock = asyncio.Lock()

    async def _run(self, fn, *args):
        """`fn(*args)` in a worker thread, one pipeline call at a time: the event loop stays free."""
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    def _refusal(self, err: Exception, field: str | None = None) -> dict:
        """The answer to a request that failed here; a device fault also marks the replica broken."""
        refused = classify(err, field)
        if refused is None:
            self.broken = f"{type(err).__name__}: {err}"
            log.error("serve: %s replica is broken: %s", type(self).__name__, self.broken)
            refused = Refused(503, None, "the model replica failed (a device fault) and is being replaced; retry",
                              retry_after=10)  # fmt: skip
        self.refused += 1
        return {"error": refused.to_dict()}

    def _use_scheduler(self, name: str, prediction_type: str | None) -> None:
        """Sample with `name` ("default": the pipeline's own), predicting what the active adapter
        learnt (None: the base's); each kind made once per replica."""
        from diffplat.models.loading import scheduler_like

        if not hasattr(self, "_schedulers"):
            self._base_scheduler, self._schedulers = self.pipe.scheduler, {}
        base_predicts = self._base_scheduler.config.get("prediction_type")
        if base_predicts is None:  # a flow-matching sampler (FLUX): nothing to switch
            prediction_type = None
        key = (name, prediction_type)
        if key not in self._schedulers:
            same = name == "default" and prediction_type in (None, base_predicts)
            self._schedulers[key] = self._base_scheduler if same else scheduler_like(self._base_scheduler, name, prediction_type)
        self.pipe.scheduler = self._schedulers[key]

    def _generator(self, seed: int):
        import torch

        return torch.Generator(self.device).manual_seed(int(seed))

    async def check_adapter(self, name: str) -> dict:
        """Fetch and load adapter `name` (an MLflow URI, say) before a request using it joins a
        batch: `{"ok": true}`, or the refusal naming the adapter."""
        try:
            await self._run(self.adapters.ensure, name)
        except Exception as err:
            return self._refusal(err, "adapter")
        return {"ok": True}

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(f"pipeline broken: {self.broken}")

    def stats(self) -> dict:
        extra = self.adapters.stats() if getattr(self, "adapters", None) else {}
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "started": self.started, "rss_mb": _rss_mb(), "requests": self.requests, "refused": self.refused,
                "busy": self._lock.locked(), "broken": self.broken, **extra}  # fmt: skip


@serve.deployment(max_ongoing_requests=8, max_queued_requests=32, ray_actor_options={"num_cpus": 0.25})
class Generator(_Replica):
    """Text-to-image with an optional LoRA; compatible requests are batched into one call."""

    def __init__(self, settings: dict):
        from diffplat.models.loading import DTYPES, load_pipeline
        from diffplat.serving.adapters import AdapterCache

        super().__init__(settings)
        s = self.settings
        self.pipe = load_pipeline(s.base_model, s.vae, s.variant, DTYPES[s.dtype]).to(self.device)
        self.adapters = AdapterCache(self.pipe, s.adapters, s.max_loaded_adapters, s.tracking_uri)
        self.batch_sizes: list[int] = []
        self.generate.set_max_batch_size(s.batching.max_batch_size if s.batching.enabled else 1)
        self.generate.set_batch_wait_timeout_s(s.batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[dict]) -> list[dict]:
        """Jobs that share adapter, size, steps, guidance, sampler and negative prompt run as one
        pipeline call; each image keeps its own seed. A group that fails answers its own members."""
        self.batch_sizes.append(len(jobs))
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            key = tuple(job[k] for k in ("adapter", "adapter_scale", "width", "height", "num_inference_steps",
                                         "guidance_scale", "scheduler", "negative_prompt"))  # fmt: skip
            groups[key].append(i)
        results: list[dict] = [{} for _ in jobs]
        for indices in groups.values():
            prompts, seeds = [], []
            for i in indices:
                prompts += [jobs[i]["prompt"]] * len(jobs[i]["seeds"])
                seeds += jobs[i]["seeds"]
            start = time.perf_counter()
            try:
                images = await self._run(self._text_to_image, jobs[indices[0]], prompts, seeds)
            except Exception as err:
                refusal = self._refusal(err)
                for i in indices:
                    results[i] = refusal
                continue
            seconds = time.perf_counter() - start
            at = 0
            for i in indices:
                n = len(jobs[i]["seeds"])
                results[i] = {"images": images[at : at + n], "seeds": jobs[i]["seeds"], "generate_s": seconds,
                              "batch": len(jobs)}  # fmt: skip
                at += n
        self.requests += len(jobs)
        return results

    def _text_to_image(self, first: dict, prompts: list[str], seeds: list[int]) -> list:
        learnt = self.adapters.activate(first["adapter"], first["adapter_scale"])
        self._use_scheduler(first["scheduler"], learnt)
        negative = [first["negative_prompt"]] * len(prompts) if first["negative_prompt"] else None
        return self.pipe(
            prompt=prompts, negative_prompt=negative, width=first["width"], height=first["height"],
            num_inference_steps=first["num_inference_steps"], guidance_scale=first["guidance_scale"],
            generator=[self._generator(s) for s in seeds],
        ).images  # fmt: skip

    def stats(self) -> dict:
        return {**super().stats(), "batch_sizes": self.batch_sizes[-200:]}


@serve.deployment(max_ongoing_requests=4, max_queued_requests=16, ray_actor_options={"num_cpus": 0.25})
class PanelFiller(_Replica):
    """In-Context LoRA panel filling on the inpainting pipeline (infer/panels.py)."""

    def __init__(self, settings: dict):
        from diffplat.infer.panels import load_fill_pipeline
        from diffplat.models.loading import DTYPES
        from diffplat.serving.adapters import AdapterCache

        super().__init__(settings)
        s = self.settings
        self.pipe = load_fill_pipeline(s.inpaint_model, None, s.vae, s.variant, DTYPES[s.dtype]).to(self.device)
        self.adapters = AdapterCache(self.pipe, s.adapters, s.max_loaded_adapters, s.tracking_uri)

    async def fill(self, job: dict) -> dict:
        start = time.perf_counter()
        try:
            fills = await self._run(self._fill, job)
        except Exception as err:
            return self._refusal(err)
        self.requests += 1
        return {"images": [f.image for f in fills], "comparisons": [f.comparison for f in fills], "seeds": job["seeds"],
                "generate_s": time.perf_counter() - start}  # fmt: skip

    def _fill(self, job: dict) -> list:
        from diffplat.infer.panels import FillOptions, fill_panels

        self._use_scheduler("default", self.adapters.activate(job["adapter"], job["adapter_scale"]))
        return fill_panels(self.pipe, job["image"], job["prompt"], job["seeds"], FillOptions(**job["options"]))


@serve.deployment(max_ongoing_requests=4, max_queued_requests=16, ray_actor_options={"num_cpus": 0.25})
class MapGenerator(_Replica):
    """ControlNet generation from a segmentation map (infer/controlnet.py)."""

    def __init__(self, settings: dict):
        from diffplat.infer.controlnet import load_controlnet_pipeline
        from diffplat.models.loading import DTYPES
        from diffplat.serving.adapters import AdapterCache

        super().__init__(settings)
        s = self.settings
        self.pipe = load_controlnet_pipeline(s.base_model, s.controlnet, None, s.vae, s.variant, DTYPES[s.dtype])
        self.pipe.to(self.device)
        self.adapters = AdapterCache(self.pipe, s.adapters, s.max_loaded_adapters, s.tracking_uri)

    async def generate(self, job: dict) -> dict:
        start = time.perf_counter()
        try:
            images = await self._run(self._from_map, job)
        except Exception as err:
            return self._refusal(err)
        self.requests += 1
        return {"images": images, "seeds": job["seeds"], "generate_s": time.perf_counter() - start}

    def _from_map(self, job: dict) -> list:
        n = len(job["seeds"])
        self._use_scheduler("default", self.adapters.activate(job["adapter"], job["adapter_scale"]))
        return self.pipe(
            prompt=[job["prompt"]] * n, negative_prompt=[job["negative_prompt"]] * n if job["negative_prompt"] else None,
            image=job["map"], controlnet_conditioning_scale=job["conditioning_scale"], width=job["width"],
            height=job["height"], num_inference_steps=job["num_inference_steps"],
            guidance_scale=job["guidance_scale"], generator=[self._generator(s) for s in job["seeds"]],
        ).images  # fmt: skip


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64, ray_actor_options={"num_cpus": 0.25})
class Detector(_Replica):
    """YOLO detection (filter/yolo.py's model); images from concurrent requests run as one batch."""

    def __init__(self, settings: dict):
        from diffplat.filter.yolo import load_detector

        super().__init__(settings)
        s = self.settings
        self.model = load_detector(s.detector)
        self.names = dict(self.model.names)
        self.detect.set_max_batch_size(s.batching.max_batch_size * 2 if s.batching.enabled else 1)
        self.detect.set_batch_wait_timeout_s(s.batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def detect(self, images: list) -> list:
        """Each image's detections; a failed batch answers every member with the refusal."""
        try:
            results = await self._run(self._predict, images)
        except Exception as err:
            return [self._refusal(err, "image")] * len(images)
        self.requests += len(images)
        return results

    def _predict(self, images: list) -> list[list[dict]]:
        import numpy as np

        from diffplat.filter.yolo import _detections

        arrays = [np.asarray(im.convert("RGB"))[..., ::-1] for im in images]  # ultralytics takes BGR arrays
        results = self.model.predict(arrays, imgsz=self.settings.detector_imgsz, conf=0.001,
                                     device=self.settings.detector_device, verbose=False)  # fmt: skip
        return [[{"class_name": d.class_name, "class_id": d.class_id, "confidence": round(d.confidence, 4),
                  "box_xywhn": [round(v, 5) for v in d.box_xywhn]} for d in _detections(r)] for r in results]  # fmt: skip
