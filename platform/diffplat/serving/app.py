"""The HTTP API on Ray Serve: a FastAPI ingress composing the model deployments by handle.

Routes: POST /v1/generate (text-to-image, optional LoRA; with `filter` it also detects and gives
each image's verdict), /v1/ic-lora (fill panels of an uploaded composite), /v1/controlnet (an
image from an uploaded segmentation map), /v1/detect (YOLO boxes); GET /healthz, /v1/stats, and
the OpenAPI page at /docs. A route exists only when its model is configured.

`build_app(args)` is the import path of the Serve configs (`serve run serve/local.yaml`,
`serve deploy serve/diffplat.yaml`, k8s/rayservice.yaml); `serve_forever` is `diffplat serve`,
the same application with the same file's options, on a Ray found by cluster.py's rule.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' real types.
import asyncio
import hashlib
import hmac
import logging
import os
import random
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application

from diffplat.config import ServeConfig
from diffplat.serving.schemas import ControlNetRequest, DetectRequest, GenerateRequest, IcLoraRequest

log = logging.getLogger("diffplat")

DEPLOYMENTS = ("Generator", "PanelFiller", "MapGenerator", "Detector", "Api")


def reject(field: str, message: str, status: int = 422):
    """The error shape FastAPI gives a validation failure: the field named in `loc`."""
    return HTTPException(status, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_ingress(routes: frozenset[str]):
    """The ingress deployment, with only the routes whose models are configured."""
    api = FastAPI(title="diffplat", version="0.1", description="Synthetic images from SDXL adapters; see /docs.")

    @serve.deployment(max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class Api:
        def __init__(self, settings: dict, key_hash: str | None, generator=None, filler=None, maps=None, detector=None):
            self.settings = ServeConfig.model_validate(settings)
            self.key_hash = key_hash
            self.generator, self.filler, self.maps, self.detector = generator, filler, maps, detector

        # --- the contract -------------------------------------------------------------------

        def _auth(self, request: Request) -> None:
            if self.key_hash is None:
                return
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # Compare digests in constant time: the key's length and content stay hidden.
            if scheme.lower() != "bearer" or not hmac.compare_digest(_key_hash(token.strip()), self.key_hash):
                raise HTTPException(401, detail="missing or wrong API key (Authorization: Bearer <key>)",
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

        def _sampling(self, body, width: int | None, height: int | None) -> dict:
            """Checks against the configured limits; the job fields every route shares."""
            lim = self.settings.limits
            if len(body.prompt) > lim.max_prompt_chars:
                raise reject("prompt", f"prompt is {len(body.prompt)} characters, at most {lim.max_prompt_chars}")
            if len(body.negative_prompt) > lim.max_prompt_chars:
                raise reject("negative_prompt", f"negative prompt is longer than {lim.max_prompt_chars} characters")
            steps = body.num_inference_steps or min(30, lim.max_steps)
            if steps > lim.max_steps:
                raise reject("num_inference_steps", f"at most {lim.max_steps} steps")
            if body.num_images > lim.max_images:
                raise reject("num_images", f"at most {lim.max_images} images a request")
            for field, value in (("width", width), ("height", height)):
                if value is not None and (value % 8 or value > lim.max_side):
                    raise reject(field, f"{field} must be a multiple of 8 and at most {lim.max_side}, got {value}")
            if body.adapter is not None:
                from diffplat.serving.adapters import UnknownAdapter, check_name

                try:
                    check_name(body.adapter, self.settings.adapters)
                except UnknownAdapter as err:
                    raise reject("adapter", str(err)) from None
            seed = body.seed if body.seed is not None else random.randrange(2**31)
            return {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "adapter": body.adapter,
                    "adapter_scale": body.adapter_scale, "num_inference_steps": steps,
                    "guidance_scale": body.guidance_scale, "seeds": [seed + i for i in range(body.num_images)]}  # fmt: skip

        def _upload(self, field: str, data: str):
            from diffplat.serving.images import UploadError, decode_upload

            lim = self.settings.limits
            try:
                return decode_upload(field, data, lim.max_upload_bytes, lim.max_pixels)
            except UploadError as err:
                raise reject(err.field, str(err), err.status) from None

        async def _call(self, method, *args):
            """A downstream call; a full queue answers 503 at once instead of piling up memory."""
            from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

            try:
                return await method.remote(*args)
            except (BackPressureError, DeploymentUnavailableError):
                raise HTTPException(503, detail="busy: too many requests in flight, retry shortly",
                                    headers={"Retry-After": "1"}) from None  # fmt: skip

        @staticmethod
        def _respond(request: Request, fmt: str, images, seeds, timings: dict, **extra):
            from diffplat.serving.images import png_base64, png_bytes

            if fmt == "png" or "image/png" in request.headers.get("accept", ""):
                return Response(png_bytes(images[0]), media_type="image/png",
                                headers={"X-Seed": str(seeds[0]), "X-Images": str(len(images))})  # fmt: skip
            items = [{"png_base64": png_base64(im), "seed": s} for im, s in zip(images, seeds)]
            return JSONResponse({"images": items, "timings": timings, **extra})

        # --- routes ---------------------------------------------------------------------------

        @api.get("/healthz")
        async def healthz(self) -> dict:
            from diffplat.serving.adapters import registry_names

            return {"status": "ok", "routes": sorted(routes), "adapters": registry_names(self.settings.adapters)}

        @api.get("/v1/stats")
        async def stats(self, request: Request) -> dict:
            """One replica's figures per deployment (memory, requests, adapters, batch sizes)."""
            self._auth(request)
            handles = {"generator": self.generator, "ic_lora": self.filler, "controlnet": self.maps,
                       "detector": self.detector}  # fmt: skip
            out = {}
            for name, handle in handles.items():
                if handle is not None:
                    out[name] = await self._call(handle.stats)
            return out

        if "generate" in routes:

            @api.post("/v1/generate")
            async def generate(self, body: GenerateRequest, request: Request, format: str = "json"):
                self._auth(request)
                start = time.perf_counter()
                s = self.settings
                width, height = body.width or s.default_resolution[0], body.height or s.default_resolution[1]
                job = {**self._sampling(body, width, height), "width": width, "height": height,
                       "scheduler": body.scheduler}  # fmt: skip
                if body.filter is not None and self.detector is None:
                    raise reject("filter", "this server has no detector configured")
                result = await self._call(self.generator.generate, job)
                extra = {}
                timings = {"generate_s": round(result["generate_s"], 4), "batch": result["batch"]}
                if body.filter is not None:
                    from diffplat.filter.rules import Detection, decide

                    found = await asyncio.gather(*[self._call(self.detector.detect, im) for im in result["images"]])
                    verdicts = []
                    for detections in found:
                        keep, why = decide([Detection(d["class_name"], d["class_id"], d["confidence"],
                                                      tuple(d["box_xywhn"])) for d in detections], body.filter)  # fmt: skip
                        counted = [d for d in detections if d["confidence"] >= body.filter.min_confidence]
                        verdicts.append({"keep": keep, "reasons": why, "detections": counted})
                    extra["filter"] = verdicts
                timings["total_s"] = round(time.perf_counter() - start, 4)
                return self._respond(request, format, result["images"], result["seeds"], timings, **extra)

        if "ic-lora" in routes:

            @api.post("/v1/ic-lora")
            async def ic_lora(self, body: IcLoraRequest, request: Request, format: str = "json"):
                from diffplat.data.composites import CompositeError, Layout

                self._auth(request)
                start = time.perf_counter()
                job = self._sampling(body, None, None)
                image = self._upload("image", body.image)
                try:
                    layout = Layout.parse(body.layout)
                except CompositeError as err:
                    raise reject("layout", str(err)) from None
                try:
                    panels = layout.check_panels(body.panels_to_inpaint, "panels_to_inpaint")
                    if len(panels) == layout.panels:
                        raise CompositeError(f"panels_to_inpaint names every panel of layout {layout}")
                except CompositeError as err:
                    raise reject("panels_to_inpaint", str(err)) from None
                try:
                    layout.check_size(image.width, image.height, "image")
                except CompositeError as err:
                    raise reject("image", str(err)) from None
                job.update(image=image, options={
                    "panels": tuple(panels), "layout": str(layout), "negative_prompt": body.negative_prompt or None,
                    "num_inference_steps": job["num_inference_steps"], "guidance_scale": body.guidance_scale,
                    "strength": body.strength, "use_gradient_mask": body.use_gradient_mask,
                    "gradient_width": body.gradient_width, "adapter_scale": body.adapter_scale})  # fmt: skip
                result = await self._call(self.filler.fill, job)
                timings = {"generate_s": round(result["generate_s"], 4), "total_s": round(time.perf_counter() - start, 4)}
                extra = {}
                if body.comparison:
                    from diffplat.serving.images import png_base64

                    extra["comparisons"] = [png_base64(c) for c in result["comparisons"]]
                return self._respond(request, format, result["images"], result["seeds"], timings, **extra)

        if "controlnet" in routes:

            @api.post("/v1/controlnet")
            async def controlnet(self, body: ControlNetRequest, request: Request, format: str = "json"):
                import numpy as np
                from PIL import Image

                from diffplat.data.bdd import MaskError, colorize_mask, mask_to_ids

                self._auth(request)
                start = time.perf_counter()
                upload = self._upload("image", body.image)
                width, height = body.width or upload.width, body.height or upload.height
                job = self._sampling(body, width, height)
                if body.segmentation:  # grey train ids or a colour map: both become the palette map
                    try:
                        upload = Image.fromarray(colorize_mask(mask_to_ids(np.asarray(upload), "image")))
                    except MaskError as err:
                        raise reject("image", str(err)) from None
                # nearest-neighbour keeps the palette colours exact
                job.update(map=upload.resize((width, height), Image.NEAREST), width=width, height=height,
                           conditioning_scale=body.conditioning_scale)  # fmt: skip
                result = await self._call(self.maps.generate, job)
                timings = {"generate_s": round(result["generate_s"], 4), "total_s": round(time.perf_counter() - start, 4)}
                return self._respond(request, format, result["images"], result["seeds"], timings)

        if "detect" in routes:

            @api.post("/v1/detect")
            async def detect(self, body: DetectRequest, request: Request):
                self._auth(request)
                start = time.perf_counter()
                image = self._upload("image", body.image)
                detections = await self._call(self.detector.detect, image)
                counted = [d for d in detections if d["confidence"] >= body.min_confidence]
                return {"detections": counted, "width": image.width, "height": image.height,
                        "timings": {"total_s": round(time.perf_counter() - start, 4)}}  # fmt: skip

    return Api


def resolve_settings(args: ServeConfig | dict, workdir: str | Path | None = None) -> ServeConfig:
    """Typed settings with relative paths made absolute against `workdir` (default: the args'
    own `workdir`, else the folder the application is built in: where `serve run` runs)."""
    settings = ServeConfig.model_validate(args)
    root = Path(workdir or settings.workdir or ".").resolve()

    def local(value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else root / path
        return str(path) if path.exists() else value  # else a hub id (or a model yaml)

    return settings.model_copy(update={"workdir": str(root), **{k: local(getattr(settings, k)) for k in
                                       ("base_model", "vae", "inpaint_model", "controlnet", "adapters", "detector")}})  # fmt: skip


def build_app(args: ServeConfig) -> Application:
    """The `import_path` of every Serve config (`diffplat.serving.app:build_app`). Ray Serve
    (`serve run`, `serve deploy`, `serve build`, a RayService) calls it with the config's `args:`,
    which Serve validates into ServeConfig (an error names the field), and applies the config's
    `deployments:` options (autoscaling, resources, queue bounds) itself, by deployment name."""
    return compose(resolve_settings(args))


def compose(settings: ServeConfig, options: dict[str, dict] | None = None) -> Application:
    """The deployments bound into one application. `options` (by deployment name) is for
    `diffplat serve`, which runs without a controller reading the config's `deployments:`."""
    from diffplat.serving.deployments import Detector, Generator, MapGenerator, PanelFiller

    options = options or {}
    spec = settings.model_dump(mode="json")

    def bound(deployment, name):
        return (deployment.options(**options[name]) if options.get(name) else deployment).bind(spec)

    # Read where the application is built: only the key's hash travels to the replicas.
    key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    handles = {
        "generator": bound(Generator, "Generator"),
        "filler": bound(PanelFiller, "PanelFiller") if settings.inpaint_model else None,
        "maps": bound(MapGenerator, "MapGenerator") if settings.controlnet else None,
        "detector": bound(Detector, "Detector") if settings.detector else None,
    }
    routes = frozenset({"generate"} | {r for r, h in (("ic-lora", "filler"), ("controlnet", "maps"),
                                                       ("detect", "detector")) if handles[h] is not None})  # fmt: skip
    api = make_ingress(routes)
    api = api.options(**options["Api"]) if options.get("Api") else api
    return api.bind(spec, _key_hash(key) if key else None, **handles)


def read_serve_config(path: str | Path) -> tuple[dict, dict, dict]:
    """(args, deployment overrides by name, http options) of the first application of a Serve
    config file (the format `serve deploy` takes)."""
    from diffplat.config import ConfigError, read_yaml_mapping

    raw = read_yaml_mapping(path, "serve config")
    apps = raw.get("applications") or []
    if not apps or "args" not in apps[0]:
        raise ConfigError(f"{path}: expected `applications:` with an `args:` section (a Ray Serve config)")
    app = apps[0]
    overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    unknown = sorted(set(overrides) - set(DEPLOYMENTS))
    if unknown:
        raise ConfigError(f"{path}: unknown deployment {unknown[0]!r} (known: {', '.join(DEPLOYMENTS)})")
    return app["args"], overrides, raw.get("http_options") or {}


def serve_forever(path: str | Path, port: int | None = None, workdir: str | Path | None = None,
                  num_cpus: int | None = None) -> None:  # fmt: skip
    """`diffplat serve`: run the API on this machine (127.0.0.1 unless the config says otherwise)
    until interrupted."""
    import signal

    import ray

    from diffplat.cluster import init_options
    from diffplat.config import ConfigError

    args, options, http = read_serve_config(path)
    try:
        settings = resolve_settings(args, workdir)
    except ValueError as err:  # pydantic's ValidationError is one
        raise ConfigError(f"{path}: invalid serve args\n{err}") from None
    host, port = http.get("host", "127.0.0.1"), port or http.get("port", 8000)
    options_ray = init_options(None, num_cpus)
    own = options_ray.get("address") == "local"  # else a cluster's (RAY_ADDRESS): leave its Serve running
    ray.init(**options_ray, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(compose(settings, options), name="diffplat", route_prefix="/")
    print(f"diffplat serve: http://{host}:{port}  (API docs at http://{host}:{port}/docs; Ctrl-C stops)", flush=True)
    stop = {"now": False}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal or SSH session went away
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if own:
            serve.shutdown()
        else:
            serve.delete("diffplat")
        ray.shutdown()
