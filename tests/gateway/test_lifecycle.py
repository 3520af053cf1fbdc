"""API keys, health, decoder outages, client disconnects, overload and metrics, end to end."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
from fake_decoder import MODEL, FakeDecoder, Script
from gateway_process import API_KEY, free_port, start_gateway, stop_gateway

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def chat_body(key: str, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": key}], "stream": stream}


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# --- API key --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"Authorization": f"Bearer {API_KEY}x"},
    ],
    ids=["missing", "wrong", "basic-scheme", "no-scheme", "longer"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/" + MODEL),
        ("GET", "/metrics"),
    ],
)
def test_protected_routes_need_the_key(gateway_auth, headers, method, path):
    r = httpx.request(
        method, gateway_auth.url + path, headers=headers, json=chat_body("x"), timeout=10
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_right_key_works_and_health_is_open(gateway_auth):
    client = openai.OpenAI(base_url=gateway_auth.v1, api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    assert httpx.get(f"{gateway_auth.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{gateway_auth.url}/metrics", headers=AUTH, timeout=10).status_code == 200
    bad = openai.OpenAI(base_url=gateway_auth.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- decoder availability -------------------------------------------------------------------------


def test_decoder_down_means_503(gateway_down):
    health = httpx.get(f"{gateway_down.url}/health", timeout=10)
    assert health.status_code == 503
    for stream in (False, True):
        r = httpx.post(
            f"{gateway_down.v1}/chat/completions", json=chat_body("x", stream), timeout=30
        )
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "decoder_unavailable"
    assert httpx.get(f"{gateway_down.v1}/models", timeout=10).status_code == 503
    # The served name is configured, so an unknown model is still a 404 while the decoder is down.
    wrong = {**chat_body("x"), "model": "other"}
    assert (
        httpx.post(f"{gateway_down.v1}/chat/completions", json=wrong, timeout=10).status_code == 404
    )


def test_gateway_started_before_the_decoder_serves_once_it_is_up(tmp_path):
    port = free_port()
    gw = start_gateway(tmp_path, port)
    late = FakeDecoder()
    try:
        assert httpx.get(f"{gw.url}/health", timeout=10).status_code == 503
        late.start(port)
        deadline, status = time.monotonic() + 20, None
        while time.monotonic() < deadline and status != 200:
            status = httpx.get(f"{gw.url}/health", timeout=10).status_code
            time.sleep(0.1)
        assert status == 200
        client = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        assert client.models.list().data[0].id == MODEL  # the name comes from the decoder
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
    finally:
        stop_gateway(gw)
        late.stop()


def test_health_follows_the_decoder_health_service(gateway, fake_decoder):
    try:
        fake_decoder.set_serving(False)
        assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 503
    finally:
        fake_decoder.set_serving(True)
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200


# --- disconnects ----------------------------------------------------------------------------------


def test_disconnect_mid_stream_cancels_generation(gateway, fake_decoder):
    key = "slow-stream"
    fake_decoder.scripts[key] = Script(pieces=["tok"] * 400, delay_s=0.05)
    before = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    with httpx.stream(
        "POST", f"{gateway.v1}/chat/completions", json=chat_body(key, True), timeout=30
    ) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ") and '"tok"' in first
    assert fake_decoder.wait_cancelled(key, timeout=15), "the decoder call was not cancelled"
    after = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    name = "vlm:gateway_client_disconnects_total"
    assert metric(after, name) == metric(before, name) + 1


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_first_token_cancels_generation(gateway, fake_decoder, stream):
    key = f"slow-start-{stream}"
    fake_decoder.scripts[key] = Script(pieces=["late"], delay_s=30)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.v1}/chat/completions", json=chat_body(key, stream), timeout=1.0)
    assert fake_decoder.wait_cancelled(key, timeout=15), "the decoder call was not cancelled"


# --- overload and metrics -------------------------------------------------------------------------


def test_overload_is_429_and_the_slot_comes_back(gateway_auth, fake_decoder):
    key = "hold-the-slot"
    fake_decoder.scripts[key] = Script(pieces=["x"] * 400, delay_s=0.05)
    url = f"{gateway_auth.v1}/chat/completions"
    with httpx.stream("POST", url, json=chat_body(key, True), headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()  # NOTE: keep the iterator; dropping it closes the connection
        assert r.status_code == 200 and next(lines).startswith("data: ")
        busy = httpx.post(url, json=chat_body("second"), headers=AUTH, timeout=10)
        assert busy.status_code == 429 and busy.headers["retry-after"]
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    assert fake_decoder.wait_cancelled(key, timeout=15)
    deadline, status = time.monotonic() + 10, None
    while time.monotonic() < deadline and status != 200:
        status = httpx.post(url, json=chat_body("third"), headers=AUTH, timeout=10).status_code
        time.sleep(0.05)
    assert status == 200


def test_metrics_count_requests_by_status(gateway):
    url = f"{gateway.url}/metrics"
    before = httpx.get(url, timeout=10).text
    httpx.post(f"{gateway.v1}/chat/completions", json=chat_body("counted"), timeout=30)
    httpx.post(f"{gateway.v1}/chat/completions", json={"messages": []}, timeout=30)
    after = httpx.get(url, timeout=10).text
    for status in ("200", "400"):
        labels = {"handler": "/v1/chat/completions", "method": "POST", "status": status}
        assert (
            metric(after, "http_requests_total", **labels)
            == metric(before, "http_requests_total", **labels) + 1
        )
    labels = {"handler": "/v1/chat/completions", "method": "POST"}
    assert metric(after, "http_request_duration_seconds_count", **labels) >= 2
    assert metric(after, "vlm:gateway_requests_in_flight") == 0
