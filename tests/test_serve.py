"""The HTTP API on a real Ray Serve, driven over real HTTP: every route, generate-then-filter,
adapters switched and evicted, every class of bad input (4xx naming the field), the API key,
and overload (503, and the server still answers afterwards)."""

import base64
import io
import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from diffplat.data import bdd
from diffplat.data.composites import Layout, make_composite
from diffplat.models.lora import INFO_NAME
from helpers import make_lora

pytestmark = pytest.mark.timeout(600)

KEY = "test-key-0123456789"


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sdxl, tiny_sdxl_inpaint, local_ray):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from ray import serve

    from diffplat.serving.app import compose, resolve_settings

    work = tmp_path_factory.mktemp("serve")
    make_lora(tiny_sdxl, work / "adapters" / "red", seed=1)
    make_lora(tiny_sdxl, work / "adapters" / "blue", seed=2)
    make_lora(tiny_sdxl_inpaint, work / "adapters" / "panels", seed=3)
    # red's weights, trained (its adapter_info.json says) to predict velocity on the epsilon base
    shutil.copytree(work / "adapters" / "red", work / "adapters" / "red-vpred")
    info = work / "adapters" / "red-vpred" / INFO_NAME
    info.write_text(json.dumps({**json.loads(info.read_text()), "prediction_type": "v_prediction"}))
    import mlflow

    # the "red" adapter also logged to an MLflow store, as a training run logs its adapter
    store = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("serve-test", artifact_location=(work / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(work / "adapters" / "red"), "adapter")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    ControlNetModel.from_unet(unet).save_pretrained(work / "controlnet", safe_serialization=True)
    args = {
        "base_model": str(tiny_sdxl), "inpaint_model": str(tiny_sdxl_inpaint), "controlnet": "controlnet",
        "adapters": "adapters", "max_loaded_adapters": 1, "detector": "yolov8n.yaml", "detector_imgsz": 64,
        "default_resolution": [64, 64], "api_key_env": "DIFFPLAT_TEST_KEY", "tracking_uri": store,
        "batching": {"enabled": True, "max_batch_size": 4, "batch_wait_timeout_s": 0.2},
        "limits": {"max_steps": 20, "max_side": 256, "max_images": 3, "max_upload_bytes": 200_000, "max_pixels": 512 * 512},
    }  # fmt: skip
    overrides = {name: {"num_replicas": 1} for name in ("Generator", "PanelFiller", "MapGenerator", "Detector", "Api")}
    overrides["Generator"].update(max_ongoing_requests=4, max_queued_requests=2)
    os.environ["DIFFPLAT_TEST_KEY"] = KEY  # read where the app is built: only its hash reaches the replicas
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(resolve_settings(args, work), overrides), name="diffplat-test", route_prefix="/")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    yield f"http://127.0.0.1:{port}", session, work, run.info.run_id
    serve.shutdown()
    os.environ.pop("DIFFPLAT_TEST_KEY", None)


def _image(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))), dtype=np.int16)


def test_health_docs_and_routes(server):
    url, http, *_ = server
    health = http.get(f"{url}/healthz").json()
    assert health["status"] == "ok" and health["routes"] == ["controlnet", "detect", "generate", "ic-lora"]
    assert health["adapters"] == ["blue", "panels", "red", "red-vpred"]
    assert requests.get(f"{url}/docs").status_code == 200
    paths = requests.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/ic-lora", "/v1/controlnet", "/v1/detect", "/healthz"} <= set(paths)


def test_generate_json_and_png_with_seeds(server):
    url, http, *_ = server
    body = {"prompt": "a car at night", "num_inference_steps": 3, "seed": 11, "num_images": 2}
    r = http.post(f"{url}/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [i["seed"] for i in out["images"]] == [11, 12] and out["timings"]["generate_s"] > 0
    first, second = (_image(i) for i in out["images"])
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() > 0
    raw = http.post(f"{url}/v1/generate?format=png", json={**body, "num_images": 1})
    assert raw.headers["content-type"] == "image/png" and raw.headers["x-seed"] == "11"
    # the same seed; alone rather than in a batch of two, so equal up to batched arithmetic
    assert np.abs(np.asarray(Image.open(io.BytesIO(raw.content)), dtype=np.int16) - first).max() <= 2


def test_generate_then_filter_in_one_request(server):
    url, http, *_ = server
    r = http.post(f"{url}/v1/generate", json={"prompt": "a street", "num_inference_steps": 2, "seed": 1, "num_images": 2,
                                              "filter": {"min_confidence": 0.5, "required_classes": ["car"]}})  # fmt: skip
    assert r.status_code == 200, r.text
    verdicts = r.json()["filter"]
    # the detector has random weights: it finds no car, so each image is rejected, saying why
    assert len(verdicts) == 2 and all(not v["keep"] and v["reasons"] == ["missing required class: car"] for v in verdicts)


def test_adapters_switch_and_evict(server):
    url, http, *_ = server
    body = {"prompt": "a road", "num_inference_steps": 3, "seed": 5}
    base = _image(http.post(f"{url}/v1/generate", json=body).json()["images"][0])
    red = _image(http.post(f"{url}/v1/generate", json={**body, "adapter": "red"}).json()["images"][0])
    blue = _image(http.post(f"{url}/v1/generate", json={**body, "adapter": "blue"}).json()["images"][0])
    red_again = _image(http.post(f"{url}/v1/generate", json={**body, "adapter": "red"}).json()["images"][0])
    base_again = _image(http.post(f"{url}/v1/generate", json=body).json()["images"][0])
    assert np.abs(red - base).max() > 0 and np.abs(blue - red).max() > 0
    assert np.array_equal(red, red_again) and np.array_equal(base, base_again)
    stats = http.get(f"{url}/v1/stats").json()["generator"]
    assert stats["loaded"] == ["red"] and stats["evictions"] >= 2  # capacity 1: red out, blue in, blue out, red in
    # the same weights named as an MLflow run's artifact
    run_id = server[3]
    from_mlflow = http.post(f"{url}/v1/generate", json={**body, "adapter": f"runs:/{run_id}/adapter"})
    assert from_mlflow.status_code == 200, from_mlflow.text
    assert np.array_equal(_image(from_mlflow.json()["images"][0]), red)


def test_an_adapter_samples_with_the_prediction_type_it_learnt(server, tiny_sdxl):
    """As the bulk jobs do (models/loading.match_prediction_type): same weights as red, another
    image; the base model's sampler is back for the next request without an adapter."""
    from diffplat.models.loading import load_pipeline

    url, http, work, _ = server
    body = {"prompt": "a road", "num_inference_steps": 3, "seed": 5}
    base = _image(http.post(f"{url}/v1/generate", json=body).json()["images"][0])
    red = _image(http.post(f"{url}/v1/generate", json={**body, "adapter": "red"}).json()["images"][0])
    vpred = _image(http.post(f"{url}/v1/generate", json={**body, "adapter": "red-vpred"}).json()["images"][0])
    assert np.abs(vpred - red).max() > 0
    assert np.array_equal(_image(http.post(f"{url}/v1/generate", json=body).json()["images"][0]), base)
    bulk = load_pipeline(str(tiny_sdxl), lora=str(work / "adapters" / "red-vpred"))
    assert bulk.scheduler.config.prediction_type == "v_prediction"


def test_ic_lora_fills_named_panels_only(server):
    url, http, *_ = server
    composite = make_composite([Image.new("RGB", (8, 8), c) for c in [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)]],
                               Layout(2, 2), (32, 32))  # fmt: skip
    r = http.post(f"{url}/v1/ic-lora", json={"image": _b64(composite), "prompt": "four panels", "panels_to_inpaint": [3],
                                             "num_inference_steps": 3, "seed": 2, "adapter": "panels", "comparison": True})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    filled, original = _image(out["images"][0]), np.asarray(composite, dtype=np.int16)
    assert np.array_equal(filled[:32], original[:32]) and np.array_equal(filled[32:, :32], original[32:, :32])
    assert np.abs(filled[32:, 32:] - original[32:, 32:]).mean() > 5
    with Image.open(io.BytesIO(base64.b64decode(out["comparisons"][0]))) as comparison:
        assert comparison.size == (3 * 64 + 2 * 8, 64)


def test_controlnet_from_grey_and_colour_maps(server):
    url, http, *_ = server
    ids = np.full((64, 64), bdd.SEG_CLASSES.index("road"), np.uint8)
    ids[:20] = bdd.SEG_CLASSES.index("sky")
    body = {"prompt": "a road", "num_inference_steps": 2, "seed": 4}
    grey = http.post(f"{url}/v1/controlnet", json={**body, "image": _b64(Image.fromarray(ids))})
    colour = http.post(f"{url}/v1/controlnet", json={**body, "image": _b64(Image.fromarray(bdd.colorize_mask(ids)))})
    assert grey.status_code == colour.status_code == 200, grey.text
    assert np.array_equal(_image(grey.json()["images"][0]), _image(colour.json()["images"][0]))  # the same map
    bad = ids.copy()
    bad[0, 0] = 77
    r = http.post(f"{url}/v1/controlnet", json={**body, "image": _b64(Image.fromarray(bad))})
    assert r.status_code == 422 and "ids outside 0-18 and 255" in r.text and r.json()["detail"][0]["loc"] == ["body", "image"]


def test_detect(server):
    url, http, *_ = server
    r = http.post(f"{url}/v1/detect", json={"image": _b64(Image.new("RGB", (96, 64), (90, 90, 90)), "JPEG")})
    assert r.status_code == 200 and r.json()["detections"] == [] and r.json()["width"] == 96


def _bomb() -> str:
    """A small PNG that claims a large canvas: 1000x1000 of one colour, a few KB."""
    return _b64(Image.new("L", (1000, 1000), 0))


@pytest.mark.parametrize("route, body, status, field", [
    ("generate", {"prompt": "x" * 3000}, 422, "prompt"),
    ("generate", {"prompt": "x", "num_inference_steps": 21}, 422, "num_inference_steps"),
    ("generate", {"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ("generate", {"prompt": "x", "width": 100}, 422, "width"),
    ("generate", {"prompt": "x", "height": 512}, 422, "height"),
    ("generate", {"prompt": "x", "num_images": 4}, 422, "num_images"),
    ("generate", {"prompt": "x", "adapter": "nope"}, 422, "adapter"),
    ("generate", {"prompt": "x", "adapter": "../adapters/red"}, 422, "adapter"),
    ("generate", {"prompt": "x", "colour": "red"}, 422, "colour"),
    ("generate", {"prompt": ""}, 422, "prompt"),
    ("ic-lora", {"prompt": "x", "image": "PANELS", "panels_to_inpaint": [4]}, 422, "panels_to_inpaint"),
    ("ic-lora", {"prompt": "x", "image": "PANELS", "panels_to_inpaint": [0, 1, 2, 3]}, 422, "panels_to_inpaint"),
    ("ic-lora", {"prompt": "x", "image": "PANELS", "layout": "2-2"}, 422, "layout"),
    ("ic-lora", {"prompt": "x", "image": "ODD"}, 422, "image"),
    ("detect", {"image": "BIG"}, 413, "image"),
    ("detect", {"image": "BOMB"}, 413, "image"),
    ("detect", {"image": "GIF"}, 415, "image"),
    ("detect", {"image": "not base64!"}, 422, "image"),
    ("detect", {"image": base64.b64encode(b"plain text").decode()}, 415, "image"),
])  # fmt: skip
def test_bad_input_is_a_4xx_naming_the_field(server, route, body, status, field):
    url, http, *_ = server
    uploads = {
        "PANELS": lambda: _b64(Image.new("RGB", (64, 64), (1, 2, 3))),
        "ODD": lambda: _b64(Image.new("RGB", (63, 64), (1, 2, 3))),
        "BIG": lambda: _b64(Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 500, 3), dtype=np.uint8))),
        "BOMB": _bomb,
        "GIF": lambda: _b64(Image.new("RGB", (16, 16)), "GIF"),
    }
    body = {k: (uploads[v]() if isinstance(v, str) and v in uploads else v) for k, v in body.items()}
    r = http.post(f"{url}/v1/{route}", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][-1] == field for d in detail), detail


def test_api_key_is_required_and_checked(server):
    url, *_ = server
    body = {"image": _b64(Image.new("RGB", (16, 16)))}
    assert requests.post(f"{url}/v1/detect", json=body).status_code == 401
    wrong = requests.post(f"{url}/v1/detect", json=body, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert requests.post(f"{url}/v1/detect", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert requests.get(f"{url}/healthz").status_code == 200  # health stays open for load balancers


def test_overload_answers_503_fast_and_the_server_lives_on(server):
    url, http, *_ = server
    body = {"prompt": "busy", "num_inference_steps": 20, "width": 256, "height": 256, "num_images": 3}

    def one(i):
        r = http.post(f"{url}/v1/generate", json={**body, "seed": i}, timeout=300)
        return r.status_code, r.elapsed.total_seconds()

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1
    slowest_503 = max(s for c, s in results if c == 503)
    assert slowest_503 < 5.0  # refused at once, not after waiting in a queue
    assert http.post(f"{url}/v1/generate", json={"prompt": "after", "num_inference_steps": 2}).status_code == 200
    assert json.loads(http.get(f"{url}/healthz").text)["status"] == "ok"


def test_a_broken_pipeline_fails_the_health_check():
    """Serve replaces a replica whose check_health raises; a replica marks itself broken when its
    pipeline fails on a request the ingress had already validated."""
    from diffplat.serving.deployments import _Replica

    replica = _Replica({"base_model": "unused"})
    replica.check_health()  # healthy: no exception
    replica._guard(RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="pipeline broken: RuntimeError: CUDA error"):
        replica.check_health()
