"""Serving: a real HTTP server on localhost (Ray Serve) over a checkpoint the tests trained."""

import importlib.util
import io
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from conftest import METRICS_EVERY_MS, encode, make_images, unusual_images
from cifar_ray.calibration import apply_temperature, temperature_of
from cifar_ray.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 4
BODY_TIMEOUT_S = 2


def benchmark(name: str):
    """A module of benchmarks/: the shortened CI tests below share its load generator."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve_load, slow_clients = benchmark("serve_load"), benchmark("slow_clients")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(two_worker_run):
    """The app from serve_config.yaml's builder, on a free loopback port, for this module."""
    from ray import serve

    from cifar_ray.serve import app

    _, summary, _ = two_worker_run
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    serve.run(app({"checkpoint": summary["best_checkpoint"], "max_body_bytes": 200_000,
                   "body_timeout_s": BODY_TIMEOUT_S}),
              name="cifar-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    requests.get(f"{url}/healthz", timeout=30).raise_for_status()
    yield url, summary["best_checkpoint"]
    serve.delete("cifar-test")
    serve.shutdown()


@pytest.fixture(scope="module")
def model(endpoint):
    """The served checkpoint's Keras model and its temperature, loaded in this process."""
    keras_model, metadata = load_checkpoint(endpoint[1], compile=False)
    assert temperature_of(metadata) != 1.0  # the end of training fitted one: Serve must apply it
    return keras_model, temperature_of(metadata)


def in_process(model, image: np.ndarray) -> np.ndarray:
    keras_model, temperature = model
    return apply_temperature(np.asarray(keras_model(image[None].astype("float32"), training=False)), temperature)[0]


def round_off(model) -> float:
    """How far the replica's probabilities may be from in_process's for the same pixels: the
    replica's compiled call runs with its own threads and batch, and oneDNN may pick other
    kernels for them. Same weights, different round-off: bfloat16's where layers compute in
    it (mixed precision on a CPU with AMX or AVX512-BF16; seen 2e-3 apart). The temperature
    divides the logits, so a temperature below 1 magnifies their round-off by 1/T in the
    probabilities (seen: 0.045 apart at T = 0.117, on an image the model is unsure of)."""
    keras_model, temperature = model
    bfloat16 = any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in keras_model.layers)
    return (1e-2 if bfloat16 else 2e-4) / min(temperature, 1.0)


def test_png_upload_raw_jpeg_and_json_match_the_model_in_process(endpoint, model):
    from PIL import Image

    url, _ = endpoint
    image = make_images(1, seed=5)[0][0]
    png, jpeg = encode(image, "PNG"), encode(image, "JPEG")
    jpeg_pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    cases = {
        "png upload": (requests.post(f"{url}/predict?top_k=10", files={"file": ("x.png", png, "image/png")},
                                     timeout=30), image),
        "raw jpeg": (requests.post(f"{url}/predict?top_k=10", data=jpeg,
                                   headers={"content-type": "image/jpeg"}, timeout=30), jpeg_pixels),
        "json": (requests.post(f"{url}/predict/json?top_k=10", json={"image": image.tolist()}, timeout=30),
                 image),
    }
    class_names = requests.get(f"{url}/metadata", timeout=30).json()["class_names"]
    tolerance = round_off(model)
    for name, (response, pixels) in cases.items():
        assert response.status_code == 200, (name, response.text)
        answer = response.json()
        expected = in_process(model, pixels)
        assert answer["class_index"] == int(expected.argmax()), name
        got = {t["class_name"]: t["probability"] for t in answer["top_k"]}
        np.testing.assert_allclose([got[c] for c in class_names], expected, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("kind", sorted(unusual_images()))
def test_unusual_uploads_are_answered_as_the_image_a_browser_shows(endpoint, model, kind):
    """EXIF orientation, 16-bit, grayscale, alpha, animation, 1x1: each gets the model's
    answer for the pixels a browser would show (tests/test_data.py checks those pixels)."""
    url, _ = endpoint
    data, pixels = unusual_images()[kind]
    answer = requests.post(f"{url}/predict?top_k=10", files={"file": ("upload", data)}, timeout=30)
    assert answer.status_code == 200, answer.text
    expected = in_process(model, pixels)
    assert answer.json()["class_index"] == int(expected.argmax())
    got = {t["class_name"]: t["probability"] for t in answer.json()["top_k"]}
    np.testing.assert_allclose([got[c] for c in model_class_names(url)], expected, atol=round_off(model))


def model_class_names(url: str) -> list[str]:
    return requests.get(f"{url}/metadata", timeout=30).json()["class_names"]


def test_json_batch_gets_one_answer_per_image(endpoint, model):
    url, _ = endpoint
    images = make_images(5, seed=6)[0]
    response = requests.post(f"{url}/predict/json", json={"images": images.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [a["class_index"] for a in answers] == [int(in_process(model, x).argmax()) for x in images]
    assert all(len(a["top_k"]) == 3 for a in answers)  # the configured default


def test_other_sizes_and_modes_are_converted(endpoint):
    url, _ = endpoint
    gray_64 = encode(np.full((64, 64), 128, np.uint8))  # grayscale, 64x64
    rgba = encode(np.full((32, 32, 4), 200, np.uint8))
    for data in (gray_64, rgba):
        response = requests.post(f"{url}/predict", data=data, headers={"content-type": "image/png"}, timeout=30)
        assert response.status_code == 200, response.text


def test_healthz_and_metadata(endpoint):
    url, checkpoint = endpoint
    health = requests.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metadata = requests.get(f"{url}/metadata", timeout=30).json()
    assert metadata["class_names"][0] == "airplane" and metadata["model"] == "shallow_cnn"
    assert metadata["data"]["source"] == "synthetic" and "val_accuracy" in metadata["training_metrics"]
    assert metadata["evaluation"]["examples"] == metadata["data"]["num_val"]  # the audit travels with it
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_model_card_route_serves_the_checkpoints_card(endpoint):
    url, checkpoint = endpoint
    card = requests.get(f"{url}/model-card", timeout=30)
    assert card.status_code == 200 and card.text == (Path(checkpoint) / "MODEL_CARD.md").read_text()


# --- the page at / in a real browser -------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium, with no network but loopback."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--window-size=820,720"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def a_cifar10_image() -> tuple[str, bytes]:
    """A real CIFAR-10 image (JPEG) when CIFAR10_PARQUET names a Parquet folder of the shared
    data's schema, else a synthetic PNG."""
    import os

    folder = os.environ.get("CIFAR10_PARQUET")
    if folder:
        import pyarrow.parquet as pq

        row = pq.read_table(sorted(Path(folder).glob("*.parquet"))[0], columns=["image"]).slice(0, 1)
        return "cifar10.jpg", row.column("image")[0].as_py()
    return "synthetic.png", encode(make_images(1, seed=11)[0][0])


def test_page_shows_an_uploaded_images_top_classes_as_the_api_answers(endpoint, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = endpoint
    name, data = a_cifar10_image()
    image = tmp_path / name
    image.write_bytes(data)
    expected = requests.post(f"{url}/predict?top_k=5", files={"file": (name, data)}, timeout=30).json()

    browser.get(f"{url}/")
    wait = WebDriverWait(browser, 30)
    model_line = wait.until(lambda d: "version" in d.find_element(By.ID, "model").text
                            and d.find_element(By.ID, "model").text)
    assert model_line.startswith(f"{expected['model']}, version {expected['model_version']}")
    browser.find_element(By.ID, "file").send_keys(str(image))
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answer li"))
    shown = [(r.get_attribute("data-class-name"), r.find_element(By.CLASS_NAME, "probability").text) for r in rows]
    assert shown == [(t["class_name"], f"{100 * t['probability']:.1f}%") for t in expected["top_k"]]
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    error = wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert error.startswith("400: undecodable image") and not browser.find_elements(By.CSS_SELECTOR, "#answer li")
    assert browser.find_element(By.LINK_TEXT, "Model card").get_attribute("href") == f"{url}/model-card"


def png_bomb(side: int = 20_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # a few rows are enough to claim the size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


BAD_REQUESTS = {
    "undecodable bytes": ("/predict", {"data": b"not an image", "headers": {"content-type": "image/png"}}, 400),
    "truncated jpeg": ("/predict", {"data": encode(make_images(1)[0][0], "JPEG")[:40],
                                    "headers": {"content-type": "image/jpeg"}}, 400),
    "empty body": ("/predict", {"data": b"", "headers": {"content-type": "image/png"}}, 400),
    "too large": ("/predict", {"data": b"x" * 300_000, "headers": {"content-type": "image/png"}}, 413),
    "wrong content type": ("/predict", {"data": b"abc", "headers": {"content-type": "text/plain"}}, 415),
    "decompression bomb": ("/predict", {"data": png_bomb(), "headers": {"content-type": "image/png"}}, 400),
    "multipart without file": ("/predict", {"files": {"other": ("x.png", b"x", "image/png")}}, 400),
    "json wrong shape": ("/predict/json", {"json": {"image": [[1, 2, 3]]}}, 422),
    "json NaN": ("/predict/json", {"data": b'{"image": [[[NaN, 0, 0]]]}',
                                   "headers": {"content-type": "application/json"}}, 400),
    "json out of range": ("/predict/json", {"json": {"image": np.full((32, 32, 3), 300).tolist()}}, 422),
    "json strings": ("/predict/json", {"json": {"image": [[["a", "b", "c"]] * 32] * 32}}, 422),
    "json not an object": ("/predict/json", {"json": [1, 2, 3]}, 422),
    "json deeply nested": ("/predict/json", {"data": b"[" * 50_000,
                                             "headers": {"content-type": "application/json"}}, 400),
    "json invalid": ("/predict/json", {"data": b"{image:", "headers": {"content-type": "application/json"}}, 400),
    "json not utf-8": ("/predict/json", {"data": b'{"image": "\xff\xfe"}',
                                         "headers": {"content-type": "application/json"}}, 400),
    "json valid but nested 10,000 deep": ("/predict/json", {"data": b'{"image": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
                                                            "headers": {"content-type": "application/json"}}, 400),
    "top_k out of range": ("/predict/json?top_k=0", {"json": {"image": np.zeros((32, 32, 3)).tolist()}}, 422),
    "top_k not a number": ("/predict/json?top_k=abc", {"json": {"image": np.zeros((32, 32, 3)).tolist()}}, 422),
    "json 31x32 pixels": ("/predict/json", {"json": {"image": np.zeros((31, 32, 3)).tolist()}}, 422),
    "json 4 channels": ("/predict/json", {"json": {"image": np.zeros((32, 32, 4)).tolist()}}, 422),
    "json negative pixels": ("/predict/json", {"json": {"image": np.full((32, 32, 3), -1).tolist()}}, 422),
    "json null image": ("/predict/json", {"json": {"image": None}}, 422),
    "json empty batch": ("/predict/json", {"json": {"images": []}}, 422),
    "multipart empty file": ("/predict", {"files": {"file": ("x.png", b"", "image/png")}}, 400),
    "png signature only": ("/predict", {"data": b"\x89PNG\r\n\x1a\n", "headers": {"content-type": "image/png"}}, 400),
    "unknown path": ("/nowhere", {"data": b"", "headers": {"content-type": "image/png"}}, 404),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_and_the_replica_keeps_serving(endpoint, name):
    url, _ = endpoint
    path, kwargs, status = BAD_REQUESTS[name]
    response = requests.post(f"{url}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert "detail" in response.json()
    assert not any(leak in response.text for leak in ("Traceback", ".py", "/tmp/", "site-packages"))
    ok = requests.post(f"{url}/predict/json", json={"image": np.zeros((32, 32, 3)).tolist()}, timeout=30)
    assert ok.status_code == 200


def test_serve_config_validates_against_ray_schema_and_names_the_app():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "cifar_ray.serve:app"
    deployment = application.deployments[0]
    assert deployment.autoscaling_config["max_replicas"] >= 2
    assert set(deployment.user_config) == {"max_batch_size", "batch_wait_timeout_s", "tta"}


def test_checkpoint_env_var_overrides_args(monkeypatch, tmp_path):
    from cifar_ray.serve import serve_config_from_args

    assert serve_config_from_args({"checkpoint": "s3://b/ckpt"})[0].checkpoint == "s3://b/ckpt"
    monkeypatch.setenv("CIFAR_RAY_CHECKPOINT", str(tmp_path))
    assert serve_config_from_args({"checkpoint": "s3://b/ckpt"})[0].checkpoint == str(tmp_path)


def test_error_bodies_name_what_failed_not_where_files_are():
    from cifar_ray.errors import without_paths

    assert (without_paths("cannot load checkpoint /data/runs/x/best: /data/runs/x/best/model.keras: cannot be loaded")
            == "cannot load checkpoint best: model.keras: cannot be loaded")
    assert (without_paths("cannot look up models:/cifar10-classifier@champion in sqlite:////srv/mlflow.db (gone)")
            == "cannot look up models:/cifar10-classifier@champion in mlflow.db (gone)")
    assert without_paths("s3://bucket/runs/a/epoch_0001/: cannot be fetched") == "epoch_0001: cannot be fetched"
    assert without_paths("content-type must be image/png or application/json") == \
        "content-type must be image/png or application/json"


def test_damaged_checkpoint_keeps_healthz_unready_and_says_why(endpoint, tmp_path):
    """A replica whose checkpoint will not load stays up, answers 503 with the reason on
    /healthz and /predict, and is not restarted in a loop."""

    from ray import serve

    from cifar_ray.serve import serve_config_from_args
    from cifar_ray.serve_deployment import Classifier

    url, checkpoint = endpoint
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    model_file = broken / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    cfg, _ = serve_config_from_args({"checkpoint": str(broken)})
    serve.run(Classifier.options(ray_actor_options={"num_cpus": 0}).bind(cfg),
              name="cifar-broken", route_prefix="/broken")
    try:
        health = requests.get(f"{url}/broken/healthz", timeout=30)
        assert health.status_code == 503
        # what failed, not where the cluster keeps its files (the replica's log has the path)
        detail = health.json()["detail"]
        assert "cannot load checkpoint broken: model.keras: cannot be loaded" in detail, detail
        predict = requests.post(f"{url}/broken/predict/json", json={"image": np.zeros((32, 32, 3)).tolist()},
                                timeout=30)
        assert predict.status_code == 503 and predict.json()["detail"] == detail
        assert str(tmp_path) not in detail
        status = serve.status().applications["cifar-broken"]
        assert status.status == "RUNNING"  # up and explaining, not crash-looping
    finally:
        serve.delete("cifar-broken")


def test_killed_replica_under_load_loses_at_most_one_percent(endpoint, ray_cluster):
    """Two replicas under 16 concurrent clients; one is SIGKILLed. At most 1% of requests
    fail, Serve replaces the replica, and a later burst succeeds in full."""
    import asyncio

    from ray import serve

    from cifar_ray.serve import serve_config_from_args
    from cifar_ray.serve_deployment import Classifier

    url, checkpoint = endpoint
    cfg, _ = serve_config_from_args({"checkpoint": checkpoint})
    serve.run(Classifier.options(num_replicas=2, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0})
              .bind(cfg), name="cifar-kill", route_prefix="/kill")
    try:
        body = encode(make_images(1)[0][0], "JPEG")
        asyncio.run(serve_load.load(f"{url}/kill/predict", body, 4, 1.0))  # warm-up
        result = asyncio.run(serve_load.load_with_replica_kill(
            f"{url}/kill/predict", body, concurrency=16, seconds=10.0, app="cifar-kill", kill_at=3.0,
            address=ray_cluster))
        assert result["requests"] > 200
        assert result["errors"] <= 0.01 * result["requests"], result["errors"]
        assert result["replaced_after_s"] is not None and result["replaced_after_s"] < 120
        after = asyncio.run(serve_load.load(f"{url}/kill/predict", body, 16, 3.0))
        assert after["errors"] == 0 and after["requests"] > 0
    finally:
        serve.delete("cifar-kill")


def test_overload_gets_a_fast_503_with_retry_after_and_the_rest_their_answer(endpoint):
    """Past max_model_requests waiting for the model, a replica answers 503 with Retry-After at
    once; nothing else fails, and the replica serves normally afterwards."""
    import asyncio
    from dataclasses import replace

    from ray import serve

    from cifar_ray.serve import serve_config_from_args
    from cifar_ray.serve_deployment import Classifier

    url, checkpoint = endpoint
    cfg, _ = serve_config_from_args({"checkpoint": checkpoint})
    serve.run(Classifier.options(ray_actor_options={"num_cpus": 0}).bind(replace(cfg, max_model_requests=2)),
              name="cifar-overload", route_prefix="/overload")
    try:
        body = encode(make_images(1)[0][0], "JPEG")
        result = asyncio.run(serve_load.load(f"{url}/overload/predict", body, 32, 1.5))
        assert result["rejected"] > 0 and result["retry_after"] == ["1"], result["retry_after"]
        assert result["errors"] == result["rejected"]  # nothing failed but the 503s
        assert result["requests"] > result["rejected"]  # and the rest were answered
        ok = requests.post(f"{url}/overload/predict", data=body, headers={"content-type": "image/jpeg"}, timeout=30)
        assert ok.status_code == 200
    finally:
        serve.delete("cifar-overload")


def test_with_an_api_token_only_requests_that_carry_it_are_answered(endpoint):
    """CIFAR_RAY_API_TOKEN on the replica: no or a wrong bearer token is a 401 before the
    body is even read (an unsupported type is 401, not 415); /healthz and the page stay open."""

    from ray import serve

    from cifar_ray.serve import serve_config_from_args
    from cifar_ray.serve_deployment import TOKEN_ENV, Classifier

    url, checkpoint = endpoint
    cfg, _ = serve_config_from_args({"checkpoint": checkpoint})
    serve.run(Classifier.options(ray_actor_options={"num_cpus": 0,
                                                    "runtime_env": {"env_vars": {TOKEN_ENV: "s3cret-token"}}})
              .bind(cfg), name="cifar-auth", route_prefix="/auth")
    try:
        body = encode(make_images(1)[0][0], "JPEG")

        def post(headers: dict, content_type: str = "image/jpeg") -> requests.Response:
            return requests.post(f"{url}/auth/predict", data=body, timeout=30,
                                 headers={"content-type": content_type, **headers})

        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
            answer = post(headers)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", headers
        assert post({}, content_type="text/plain").status_code == 401
        for route in ("/metadata", "/model-card"):
            assert requests.get(f"{url}/auth{route}", timeout=30).status_code == 401
        feedback = requests.post(f"{url}/auth/feedback", json={"request_id": "x", "label": 1}, timeout=30)
        assert feedback.status_code == 401
        good = {"authorization": "Bearer s3cret-token"}
        assert post(good).status_code == 200
        assert requests.get(f"{url}/auth/metadata", headers=good, timeout=30).status_code == 200
        assert requests.get(f"{url}/auth/healthz", timeout=30).status_code == 200
        assert requests.get(f"{url}/auth/", timeout=30).status_code == 200
        assert post({}).json() == {"detail": "missing or wrong bearer token"}  # and nothing more
    finally:
        serve.delete("cifar-auth")


def test_a_client_that_trickles_its_body_gets_a_408_and_its_connection_closed(endpoint):
    """A client declaring 100 kB and sending a byte every 0.2 s gets a 408 after body_timeout_s,
    and the server closes the connection: it is not left reading the trickle."""
    url, _ = endpoint
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    answer, closed = b"", False
    with socket.create_connection((host, int(port)), timeout=0.2) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\n")
        while not closed and time.monotonic() - started < BODY_TIMEOUT_S + 20:
            try:
                s.sendall(b"x")
                data = s.recv(1000)
                answer += data
                closed = not data
            except socket.timeout:
                continue
            except OSError:
                closed = True
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert closed and BODY_TIMEOUT_S - 1 < elapsed < BODY_TIMEOUT_S + 10, (closed, elapsed)
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_slow_clients_cost_normal_requests_nothing_and_are_closed(endpoint):
    """benchmarks/slow_clients.py, shortened: 200 connections trickling their bodies, and
    normal requests meanwhile. None fails, p99 under 1 s, and the server closes at least 90%
    of the slow connections within a minute (here: body_timeout_s)."""
    import asyncio

    url, _ = endpoint
    host, port = url.removeprefix("http://").split(":")
    result = asyncio.run(slow_clients.run(host, int(port), slow=200, rate=4, duration=8, watch_s=20))
    assert result["normal_requests"] >= 30 and result["normal_failed"] == 0, result
    assert result["normal_p99_s"] < 1.0, result
    assert result["slow_closed_within_60s"] >= 0.9 and result["slow_answers"].get("408", 0) >= 180, result


def metric_lines(timeout_s: float, done) -> list[str]:
    """This node's `ray_cifar_ray_` lines from Ray's Prometheus export, polled until
    `done(lines)` holds or `timeout_s` passes: replicas report every few seconds."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_cifar_ray_")]
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def metric_value(lines: list[str], *parts: str) -> float:
    """The sum of the samples whose line contains every one of `parts`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(p in line for p in parts))


def test_prometheus_metrics_count_answers_classes_stages_batches_and_the_version(endpoint, model):
    url, _ = endpoint
    image = make_images(1, seed=9)[0][0]
    expected = requests.get(f"{url}/metadata", timeout=30).json()["class_names"][int(in_process(model, image).argmax())]
    before = metric_lines(0, lambda lines: True)
    for _ in range(3):
        assert requests.post(f"{url}/predict", data=encode(image, "PNG"), headers={"content-type": "image/png"},
                             timeout=30).status_code == 200
    assert requests.post(f"{url}/predict", data=b"x", headers={"content-type": "text/plain"}, timeout=30
                         ).status_code == 415
    last_request = time.monotonic()
    app = 'application="cifar-test"'
    expectations = {  # (what the line contains, how much it must have grown by at least)
        "200s": (("ray_cifar_ray_requests_total{", app, 'endpoint="/predict"', 'status="200"'), 3),
        "415s": (("ray_cifar_ray_requests_total{", app, 'endpoint="/predict"', 'status="415"'), 1),
        "top-1 class": (("ray_cifar_ray_predictions_total{", app, f'class_name="{expected}"'), 3),
        **{f"{stage} time": (("ray_cifar_ray_stage_ms_count{", app, f'stage="{stage}"'), 3)
           for stage in ("read", "decode", "queue", "model")},
        "batch sizes": (("ray_cifar_ray_batch_images_count{", app), 1),
        "latency by version": (("ray_cifar_ray_latency_ms_count{", app, 'model_version="'), 3),
    }

    def grown(lines: list[str]) -> dict:
        return {name: metric_value(lines, *parts) - metric_value(before, *parts)
                for name, (parts, _) in expectations.items()}

    def done(lines: list[str]) -> bool:
        return all(grown(lines)[name] >= least for name, (_, least) in expectations.items()) \
            and metric_value(lines, "ray_cifar_ray_model_version{", app) == 1

    lines = metric_lines(60, done)
    assert done(lines), (grown(lines), [line for line in lines if "model_version{" in line])
    # No request for longer than Ray keeps a gauge (2 export intervals): the replica renews its own.
    time.sleep(max(0.0, last_request + 2 * METRICS_EVERY_MS / 1000 + 1 - time.monotonic()))
    assert metric_value(metric_lines(0, lambda lines: True), "ray_cifar_ray_model_version{", app) == 1
