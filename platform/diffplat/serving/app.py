"""The HTTP API on Ray Serve: a FastAPI ingress composing the model deployments by handle.

Routes: POST /v1/generate (text-to-image, optional LoRA; with `filter` it also detects and gives
each image's verdict), /v1/ic-lora (fill panels of an uploaded composite), /v1/controlnet (an
image from an uploaded segmentation map), /v1/detect (YOLO boxes); GET /healthz, /v1/info,
/v1/stats, and the OpenAPI page at /docs. A route exists only when its model is configured.

Every request's cost is bounded before a model sees it: the body's size (413, before it is read
or the key is checked), the key (401 on every route but /healthz), then each field against the
configured limits, one budget of images x width x height x steps included (422 naming the field).

`build_app(args)` is the import path of the Serve configs (`serve run serve/local.yaml`,
`serve deploy serve/diffplat.yaml`, k8s/rayservice.yaml); `serve_forever` is `diffplat serve`,
the same application with the same file's options, on a Ray found by cluster.py's rule.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' real types.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve import Application

from diffplat.config import ConfigError, ServeConfig
from diffplat.serving.errors import Refused, answers, problem
from diffplat.serving.schemas import ControlNetRequest, DetectRequest, GenerateRequest, IcLoraRequest

log = logging.getLogger("diffplat")

DEPLOYMENTS = ("Generator", "PanelFiller", "MapGenerator", "Detector", "Api")
OPEN_PATHS = ("/healthz",)  # answered without the key: load balancers' health checks
BODY_SLACK = 64 * 1024  # JSON fields besides the image's base64
IMAGE_ANSWER = {200: {"content": {"application/json": {}, "image/png": {}},
                      "description": "images as base64 PNG with their seeds (JSON), or with format=png the first "
                                     "image alone"}}  # fmt: skip


def reject(field: str | None, message: str, status: int = 422):
    """The error shape FastAPI gives a validation failure: the field named in `loc`."""
    return HTTPException(status, detail=problem(field, message)["detail"])


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def max_body_bytes(settings: ServeConfig) -> int:
    return settings.limits.max_upload_bytes * 4 // 3 + BODY_SLACK


class Guard:
    """ASGI middleware in front of every route: a body larger than `max_body` is refused (413)
    as it streams in, before it is parsed or the key is checked; then every route but /healthz
    needs the key (401), /docs and /openapi.json included. Only the key's hash is held."""

    def __init__(self, app, key_hash: str | None, max_body: int):
        self.app, self.key_hash, self.max_body = app, key_hash, max_body

    async def _answer(self, send, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *extra]})  # fmt: skip
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_large = problem(None, f"the body is larger than {self.max_body} bytes", "too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._answer(send, 413, too_large)
        chunks, size, more = [], 0, True
        while more:  # read whole (it is bounded), so a body without a length is held to the limit too
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await self._answer(send, 413, too_large)
        if self.key_hash is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            # Compare digests in constant time: the key's length and content stay hidden.
            if scheme.lower() != "bearer" or not hmac.compare_digest(_key_hash(token.strip()), self.key_hash):
                return await self._answer(send, 401, problem("authorization", "missing or wrong API key "
                                                             "(Authorization: Bearer <key>)", where="header"),
                                          {"WWW-Authenticate": "Bearer"})  # fmt: skip
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def again():
            return replay.pop() if replay else await receive()

        return await self.app(scope, again, send)


def make_ingress(routes: frozenset[str], key_hash: str | None, max_body: int):
    """The ingress deployment, with only the routes whose models are configured."""
    api = FastAPI(title="diffplat", version="0.2", description="Synthetic images from SDXL adapters. Every route "
                  "but /healthz needs `Authorization: Bearer <key>` when the server has a key.")  # fmt: skip
    api.add_middleware(Guard, key_hash=key_hash, max_body=max_body)

    @api.exception_handler(Refused)
    async def _refused(request: Request, err: Refused):
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        """FastAPI's own refusals (a body that is not JSON is a 400) in the one refusal shape."""
        body = {"detail": err.detail} if isinstance(err.detail, list) else problem(None, str(err.detail), "bad_request")
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @serve.deployment(max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class Api:
        def __init__(self, settings: dict, generator=None, filler=None, maps=None, detector=None):
            from diffplat.models.families import family_of

            self.settings = ServeConfig.model_validate(settings)
            self.generator, self.filler, self.maps, self.detector = generator, filler, maps, detector
            self.family = family_of(self.settings.base_model).name  # the adapters a request may name fit it
            self.checked_adapters: set[str] = set()  # URIs a replica fetched and loaded once already

        # --- the contract -------------------------------------------------------------------

        def _sampling(self, body, width: int | None, height: int | None) -> dict:
            """Checks against the configured limits; the job fields every route shares. The
            budget is checked when the size is known (`width` and `height`)."""
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
            if width is not None and height is not None:
                self._budget(body.num_images, width, height, steps)
            if body.adapter is not None:
                from diffplat.serving.adapters import UnknownAdapter, check_name

                try:
                    check_name(body.adapter, self.settings.adapters, self.family)
                except UnknownAdapter as err:
                    raise reject("adapter", str(err)) from None
            seed = body.seed if body.seed is not None else random.randrange(2**31)
            return {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "adapter": body.adapter,
                    "adapter_scale": body.adapter_scale, "num_inference_steps": steps,
                    "guidance_scale": body.guidance_scale, "seeds": [seed + i for i in range(body.num_images)]}  # fmt: skip

        def _budget(self, images: int, width: int, height: int, steps: int) -> None:
            cost, most = images * width * height * steps, self.settings.limits.max_pixel_steps
            if cost > most:
                raise reject(None, f"{images} images x {width}x{height} x {steps} steps = {cost} pixel-steps, more "
                             f"than this server's {most} a request: ask for fewer, smaller images or fewer steps")  # fmt: skip

        async def _upload(self, field: str, data: str):
            """Decoded off the event loop (a large image takes a while)."""
            from diffplat.serving.images import UploadError, decode_upload

            lim = self.settings.limits
            try:
                return await asyncio.to_thread(decode_upload, field, data, lim.max_upload_bytes, lim.max_pixels)
            except UploadError as err:
                raise reject(err.field, str(err), err.status) from None

        async def _call(self, method, *args):
            """A downstream call; a full queue answers 503 at once instead of piling up memory, and
            a replica's refusal becomes the HTTP answer."""
            from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

            try:
                result = await method.remote(*args)
            except (BackPressureError, DeploymentUnavailableError):
                raise Refused(503, None, "busy: too many requests in flight, retry shortly", retry_after=1) from None
            if isinstance(result, dict) and "error" in result:
                raise Refused.from_dict(result["error"])
            return result

        async def _adapter_ready(self, handle, adapter: str | None) -> None:
            """An adapter fetched from MLflow (runs:/..., models:/...) is fetched and loaded by a
            replica before a request using it joins a batch, once per URI (an alias each time: it
            can move): a bad one fails alone."""
            if adapter is None or not adapter.startswith(("runs:/", "models:/")) or adapter in self.checked_adapters:
                return
            await self._call(handle.check_adapter, adapter)
            if "@" not in adapter:
                self.checked_adapters.add(adapter)

        @staticmethod
        async def _respond(request: Request, fmt: str, images, seeds, timings: dict, start: float, **extra):
            """PNG encoding off the event loop; `timings` gains encode_s and total_s (the ingress's
            whole time; bench/serve_load.py splits a request's latency with them)."""
            from diffplat.serving.images import png_base64, png_bytes

            encode = time.perf_counter()
            if fmt == "png" or "image/png" in request.headers.get("accept", ""):
                data = await asyncio.to_thread(png_bytes, images[0])
                done = time.perf_counter()
                return Response(data, media_type="image/png", headers={
                    "X-Seed": str(seeds[0]), "X-Images": str(len(images)),
                    "X-Timings": json.dumps({**timings, "encode_s": round(done - encode, 4),
                                             "total_s": round(done - start, 4)})})  # fmt: skip
            encoded = await asyncio.to_thread(lambda: [png_base64(im) for im in images])
            done = time.perf_counter()
            timings = {**timings, "encode_s": round(done - encode, 4), "total_s": round(done - start, 4)}
            items = [{"png_base64": e, "seed": s} for e, s in zip(encoded, seeds)]
            return JSONResponse({"images": items, "timings": timings, **extra})

        async def _model(self, method, job: dict) -> tuple[dict, dict]:
            """A model call and its timings: the pipeline's own time in the replica, and the
            round trip seen from here (the difference is the hop and any batching wait)."""
            start = time.perf_counter()
            result = await self._call(method, job)
            timings = {"generate_s": round(result["generate_s"], 4),
                       "model_call_s": round(time.perf_counter() - start, 4)}  # fmt: skip
            if "batch" in result:
                timings["batch"] = result["batch"]
            return result, timings

        # --- routes ---------------------------------------------------------------------------

        @api.get("/healthz")
        async def healthz(self) -> dict:
            """Open to load balancers; says nothing about the server."""
            return {"status": "ok"}

        @api.get("/v1/info", responses=answers(401, 413))
        async def info(self) -> dict:
            """The routes this server has and the adapters a request may name."""
            from diffplat.serving.adapters import registry_names

            return {"routes": sorted(routes), "adapters": registry_names(self.settings.adapters, self.family),
                    "limits": self.settings.limits.model_dump()}  # fmt: skip

        @api.get("/v1/stats", responses=answers(401, 413, 503))
        async def stats(self) -> dict:
            """One replica's figures per deployment (memory, requests, adapters, batch sizes)."""
            handles = {"generator": self.generator, "ic_lora": self.filler, "controlnet": self.maps,
                       "detector": self.detector}  # fmt: skip
            out = {}
            for name, handle in handles.items():
                if handle is not None:
                    out[name] = await self._call(handle.stats)
            return out

        if "generate" in routes:

            @api.post("/v1/generate", responses={**IMAGE_ANSWER, **answers(400, 401, 413, 422, 503)})
            async def generate(self, body: GenerateRequest, request: Request, format: Literal["json", "png"] = "json"):
                start = time.perf_counter()
                s = self.settings
                width, height = body.width or s.default_resolution[0], body.height or s.default_resolution[1]
                job = {**self._sampling(body, width, height), "width": width, "height": height,
                       "scheduler": body.scheduler}  # fmt: skip
                if body.filter is not None and self.detector is None:
                    raise reject("filter", "this server has no detector configured")
                await self._adapter_ready(self.generator, body.adapter)
                result, timings = await self._model(self.generator.generate, job)
                extra = {}
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
                return await self._respond(request, format, result["images"], result["seeds"], timings, start, **extra)

        if "ic-lora" in routes:

            @api.post("/v1/ic-lora", responses={**IMAGE_ANSWER, **answers(400, 401, 413, 415, 422, 503)})
            async def ic_lora(self, body: IcLoraRequest, request: Request, format: Literal["json", "png"] = "json"):
                from diffplat.data.composites import CompositeError, Layout
                from diffplat.infer.panels import working_size

                start = time.perf_counter()
                lim = self.settings.limits
                job = self._sampling(body, None, None)
                try:
                    layout = Layout.parse(body.layout)
                except CompositeError as err:
                    raise reject("layout", str(err)) from None
                try:
                    layout = layout.sized(body.panel_heights, body.panel_widths, "panel sizes")
                except CompositeError as err:
                    raise reject("panel_heights" if "heights" in str(err) else "panel_widths", str(err)) from None
                if layout.panels > lim.max_panels:
                    raise reject("layout", f"layout {layout} has {layout.panels} panels, at most {lim.max_panels}")
                try:
                    panels = layout.check_panels(body.panels_to_inpaint, "panels_to_inpaint")
                    if len(panels) == layout.panels:
                        raise CompositeError(f"panels_to_inpaint names every panel of layout {layout}")
                except CompositeError as err:
                    raise reject("panels_to_inpaint", str(err)) from None
                image = await self._upload("image", body.image)
                if max(image.size) > lim.max_side:
                    raise reject("image", f"the composite is {image.width}x{image.height}; at most {lim.max_side} "
                                 "a side")  # fmt: skip
                try:
                    layout.check_size(image.width, image.height, "image")
                except CompositeError as err:
                    raise reject("image", str(err)) from None
                boxes = layout.boxes(image.width, image.height)
                if min(min(r - x, b - y) for x, y, r, b in boxes) < 8:
                    raise reject("image", f"a {image.width}x{image.height} composite of layout {layout} has panels "
                                 "smaller than 8 pixels (one latent cell)")  # fmt: skip
                # The pipeline works at whole latent cells a panel: that size is what is bounded.
                width, height = working_size(layout, image.width, image.height)
                if max(width, height) > lim.max_side:
                    raise reject("image", f"the composite works at {width}x{height} (whole latent cells a panel); "
                                 f"at most {lim.max_side} a side")  # fmt: skip
                steps = job["num_inference_steps"]
                denoised = min(int(steps * body.strength), steps)  # as diffusers' get_timesteps counts them
                if denoised < 1:
                    raise reject("strength", f"strength {body.strength} x {steps} steps leaves no denoising step; "
                                 f"raise strength or num_inference_steps")  # fmt: skip
                self._budget(body.num_images, width, height, denoised)
                job.update(image=image, options={
                    "panels": tuple(panels), "layout": str(layout), "panel_heights": layout.heights,
                    "panel_widths": layout.widths, "negative_prompt": body.negative_prompt or None,
                    "num_inference_steps": steps, "guidance_scale": body.guidance_scale,
                    "strength": body.strength, "use_gradient_mask": body.use_gradient_mask,
                    "gradient_width": body.gradient_width, "adapter_scale": body.adapter_scale})  # fmt: skip
                await self._adapter_ready(self.filler, body.adapter)
                result, timings = await self._model(self.filler.fill, job)
                extra = {}
                if body.comparison:
                    from diffplat.serving.images import png_base64

                    extra["comparisons"] = await asyncio.to_thread(lambda: [png_base64(c) for c in result["comparisons"]])
                return await self._respond(request, format, result["images"], result["seeds"], timings, start, **extra)

        if "controlnet" in routes:

            @api.post("/v1/controlnet", responses={**IMAGE_ANSWER, **answers(400, 401, 413, 415, 422, 503)})
            async def controlnet(self, body: ControlNetRequest, request: Request,
                                 format: Literal["json", "png"] = "json"):  # fmt: skip
                start = time.perf_counter()
                self._sampling(body, None, None)  # the cheap checks first, before decoding the upload
                upload = await self._upload("image", body.image)
                width, height = body.width or upload.width, body.height or upload.height
                job = self._sampling(body, width, height)
                try:
                    control = await asyncio.to_thread(_control_map, upload, body.segmentation, width, height)
                except ValueError as err:  # MaskError: not a map of train ids or palette colours
                    raise reject("image", str(err)) from None
                job.update(map=control, width=width, height=height, conditioning_scale=body.conditioning_scale)
                await self._adapter_ready(self.maps, body.adapter)
                result, timings = await self._model(self.maps.generate, job)
                return await self._respond(request, format, result["images"], result["seeds"], timings, start)

        if "detect" in routes:

            @api.post("/v1/detect", responses=answers(400, 401, 413, 415, 422, 503))
            async def detect(self, body: DetectRequest):
                start = time.perf_counter()
                image = await self._upload("image", body.image)
                detections = await self._call(self.detector.detect, image)
                counted = [d for d in detections if d["confidence"] >= body.min_confidence]
                return {"detections": counted, "width": image.width, "height": image.height,
                        "timings": {"total_s": round(time.perf_counter() - start, 4)}}  # fmt: skip

    return Api


def _control_map(upload, segmentation: bool, width: int, height: int):
    """The uploaded map as the palette image ControlNet was trained on, at the asked size."""
    import numpy as np
    from PIL import Image

    from diffplat.data.bdd import colorize_mask, mask_to_ids

    if segmentation:  # grey train ids or a colour map: both become the palette map
        upload = Image.fromarray(colorize_mask(mask_to_ids(np.asarray(upload), "image")))
    return upload.resize((width, height), Image.NEAREST)  # nearest-neighbour keeps the palette colours exact


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

    # MLflow adapters (runs:/, models:/) come from the store jobs log to: $MLFLOW_TRACKING_URI, else
    # the args' tracking_uri, else the work folder's own SQLite store (what a job there writes)
    store = root / "mlflow.db"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri or (f"sqlite:///{store}" if store.is_file() else None)
    return settings.model_copy(update={"workdir": str(root), "tracking_uri": uri, **{k: local(getattr(settings, k)) for k in
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

    key_hash = None
    if settings.auth == "key":  # read where the application is built: only its hash travels on
        key = os.environ.get(settings.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"serve: auth is 'key' (the default) but the environment variable "
                              f"{settings.api_key_env} (api_key_env) is missing or empty where the application is "
                              f"built; set it, or set `auth: none` for an open API on 127.0.0.1")  # fmt: skip
        key_hash = _key_hash(key)
    if settings.detector:
        from diffplat.extras import require

        require(["detect"], f"the Serve config's detector ({settings.detector})")
    handles = {
        "generator": bound(Generator, "Generator"),
        "filler": bound(PanelFiller, "PanelFiller") if settings.inpaint_model else None,
        "maps": bound(MapGenerator, "MapGenerator") if settings.controlnet else None,
        "detector": bound(Detector, "Detector") if settings.detector else None,
    }
    routes = frozenset({"generate"} | {r for r, h in (("ic-lora", "filler"), ("controlnet", "maps"),
                                                       ("detect", "detector")) if handles[h] is not None})  # fmt: skip
    api = make_ingress(routes, key_hash, max_body_bytes(settings))
    api = api.options(**options["Api"]) if options.get("Api") else api
    return api.bind(spec, **handles)


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

    from diffplat.cluster import init_options, settle_on_one_machine, starts_own_ray

    args, options, http = read_serve_config(path)
    try:
        settings = resolve_settings(args, workdir)
    except ValueError as err:  # pydantic's ValidationError is one
        raise ConfigError(f"{path}: invalid serve args\n{err}") from None
    app = compose(settings, options)  # before Ray starts: a missing API key is one line, at once
    host, port = http.get("host", "127.0.0.1"), port or http.get("port", 8000)
    options_ray = init_options(None, num_cpus)
    own = starts_own_ray(options_ray)  # else a cluster's (RAY_ADDRESS): leave its Serve running
    if own:  # e.g. Serve's patience with a slow HTTP proxy on a busy laptop
        settle_on_one_machine()
    ray.init(**options_ray, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="diffplat", route_prefix="/")
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
