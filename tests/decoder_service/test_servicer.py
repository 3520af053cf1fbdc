"""The decoder service over real gRPC on 127.0.0.1: answers, errors, cancellation, metrics.

One encoder and one decoder run in this process (background event loop) on the tiny GLM-4.5V
checkpoint; the decoder also lists a dead encoder address, which it must skip. Expected token ids
come from transformers' greedy ``generate`` and from the tokenizer, never from the service.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from decoder_harness import (
    MAX_MODEL_LEN,
    ServiceLoop,
    chat,
    collect,
    decoder_config,
    free_port,
    health,
    image,
    long_request,
    png,
    start_decoder,
    start_encoder,
    stub,
    text,
    wait_for,
)
from engine_reference import draw_image
from tokenizers import Tokenizer

from decoder_service.server import DecoderServer
from models.glm4v.config import load_model_config
from protos import decoder_pb2 as pb

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(tiny_ckpt_45: Path):
    loop = ServiceLoop()
    encoder, enc_port = start_encoder(loop, tiny_ckpt_45)
    dead = f"127.0.0.1:{free_port()}"
    config = decoder_config(tiny_ckpt_45, (dead, f"127.0.0.1:{enc_port}"))
    metrics_port = free_port()
    config = replace(
        config, server=replace(config.server, enable_metrics=True, metrics_port=metrics_port)
    )
    decoder = start_decoder(loop, config)
    yield decoder, stub(decoder.port), metrics_port
    loop.run(decoder.stop(grace_s=1))
    loop.run(encoder.stop(grace_s=1))
    loop.close()


@pytest.fixture(scope="module")
def tok(tiny_ckpt_45: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_ckpt_45 / "tokenizer.json"))


def engine_idle(server: DecoderServer) -> bool:
    stats = server.runtime.loop.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_usage == 0


def metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.fixture
def slow_service(service, monkeypatch):
    """The service with each engine step slowed by 5 ms for one test.

    The tiny model can finish a whole long request within a gRPC round trip or a short deadline;
    slowed, a long request needs over a second, so it is still in flight when the test acts on it.
    """
    engine = service[0].runtime.loop.engine
    step = engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return service


def test_model_info_and_health_describe_the_checkpoint(service, tiny_ckpt_45):
    decoder, client, _ = service
    info = client.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    cfg = load_model_config(tiny_ckpt_45)
    assert info.vocab_size == cfg.text.vocab_size
    assert tuple(info.eos_token_ids) == tuple(cfg.text.eos_token_ids)
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.served_model_name == tiny_ckpt_45.name
    assert set(info.modalities) == {pb.TEXT, pb.IMAGE, pb.VIDEO}
    assert (info.limits.max_images_per_prompt, info.limits.max_videos_per_prompt) == (2, 1)
    assert health(decoder.port) == "SERVING"


def test_chat_with_an_image_matches_transformers_greedy(service, reference):
    _, client, _ = service
    img = draw_image(96, 72, seed=11)
    spec = reference.build([("image", img), ("text", "What is drawn here?")])
    expected = reference.generate(spec, 6)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    request = chat(image(buf.getvalue()), text("What is drawn here?"), temperature=0, max_tokens=6)
    ids, _, last = collect(client.Generate(request, timeout=60))
    eos = set(reference.model.generation_config.eos_token_id)
    cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    assert ids == expected[:cut]
    assert last.usage.prompt_tokens == len(spec.prompt_ids)
    assert last.usage.completion_tokens == len(ids)


def test_streamed_text_is_the_detokenized_output(service, tok):
    _, client, _ = service
    request = pb.GenerateRequest(
        prompt="The quick brown fox",
        sampling=pb.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    )
    ids, streamed, last = collect(client.Generate(request, timeout=60))
    assert len(ids) == 12 and last.finish_reason == pb.LENGTH
    assert streamed == tok.decode(ids, skip_special_tokens=True)
    assert last.usage.prompt_tokens == len(tok.encode("The quick brown fox").ids)


def test_stop_tokens_and_stop_strings_never_reach_the_text(service, tok):
    _, client, _ = service
    base = pb.SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, skip_special_tokens=False
    )
    first, _, _ = collect(client.Generate(pb.GenerateRequest(prompt="abc", sampling=base)))
    k = next(i for i in range(2, 10) if first[i] not in first[:i])
    with_stop = replace_sampling(base, stop_token_ids=[first[k]])
    ids, out, last = collect(client.Generate(pb.GenerateRequest(prompt="abc", sampling=with_stop)))
    assert last.finish_reason == pb.STOP
    assert ids == first[: k + 1]  # the stop token is reported as a token ...
    assert out == tok.decode(first[:k], skip_special_tokens=False)  # ... but not as text
    full = tok.decode(first, skip_special_tokens=False)
    word = next(w for w in full.split() if len(w) > 1)
    with_string = replace_sampling(base, stop=[word])
    _, out, last = collect(client.Generate(pb.GenerateRequest(prompt="abc", sampling=with_string)))
    assert last.finish_reason == pb.STOP
    assert word not in out and full.startswith(out)


def test_thinking_budget_closes_thinking_through_the_service(service, tok):
    _, client, _ = service
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    newline = tok.encode("\n", add_special_tokens=False).ids
    # a prompt that leaves the model inside an open <think> block
    prompt = tok.encode("Think about the sea", add_special_tokens=False).ids + [think]

    def ask(**budget: int) -> tuple[list[int], str, list[pb.TokenLogprob], pb.GenerateResponse]:
        sampling = pb.SamplingParams(
            temperature=0, max_tokens=10, ignore_eos=True, skip_special_tokens=False, **budget
        )
        sampling.logprobs = True
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
        responses = list(client.Generate(request, timeout=60))
        ids, text, last = collect(responses)
        return ids, text, [lp for r in responses for lp in r.logprobs], last

    free, _, free_lps, _ = ask()
    assert end not in free[:3]
    ids, out, lps, last = ask(thinking_budget=3)
    assert ids[:3] == free[:3] and ids[3 : 4 + len(newline)] == [end, *newline]
    assert out == tok.decode(ids, skip_special_tokens=False) and "</think>\n" in out
    assert last.usage.completion_tokens == len(ids) == 10 and last.finish_reason == pb.LENGTH
    assert [lp.token_id for lp in lps] == ids
    assert lps[3].token == "</think>" and lps[3].logprob < 0
    # before the budget ran out the model's own choices and their logprobs are untouched
    assert [lp.logprob for lp in lps[:3]] == pytest.approx([lp.logprob for lp in free_lps[:3]])


def test_tool_choice_required_named_and_none_through_the_service(service, tok):
    _, client, _ = service
    weather = pb.Tool(name="get_weather")
    clock = pb.Tool(name="get_time")

    def ask(tools: list[pb.Tool], mode=pb.ToolChoice.AUTO, name: str = ""):
        request = chat(
            text("Weather in Paris?"), temperature=0, max_tokens=8, skip_special_tokens=False
        )
        request.chat.enable_thinking = False  # the prompt closes thinking: `<think></think>\n`
        request.chat.tools.extend(tools)
        request.chat.tool_choice.mode, request.chat.tool_choice.function_name = mode, name
        return collect(client.Generate(request, timeout=60))

    _, auto_text, _ = ask([weather, clock])
    assert not auto_text.startswith("<tool_call>")  # the model would not call on its own
    ids, out, _ = ask([weather, clock], pb.ToolChoice.REQUIRED)
    assert ids[0] == tok.token_to_id("<tool_call>") and out.startswith("<tool_call>")
    named = tok.encode("<tool_call>get_time\n", add_special_tokens=False).ids
    ids, out, last = ask([weather, clock], pb.ToolChoice.NAMED, "get_time")
    assert ids[: len(named)] == named and out.startswith("<tool_call>get_time\n")
    # the named function is the only one the model is shown
    _, _, only_clock = ask([clock])
    assert last.usage.prompt_tokens == only_clock.usage.prompt_tokens
    # "none": tools are not rendered at all, so the answer is the tool-less one
    no_tools_ids, _, no_tools = ask([])
    ids, _, last = ask([weather, clock], pb.ToolChoice.NONE)
    assert ids == no_tools_ids and last.usage.prompt_tokens == no_tools.usage.prompt_tokens


def replace_sampling(base: pb.SamplingParams, **fields) -> pb.SamplingParams:
    out = pb.SamplingParams()
    out.CopyFrom(base)
    for name, value in fields.items():
        getattr(out, name).extend(value)
    return out


BAD = {
    "no input": (pb.GenerateRequest(), "invalid_prompt"),
    "empty prompt": (pb.GenerateRequest(prompt=""), "invalid_prompt"),
    "token outside vocab": (
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6])),
        "invalid_prompt",
    ),
    "temperature 3": (
        pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=3)),
        "invalid_parameter.temperature",
    ),
    "top_p 0": (
        pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=0)),
        "invalid_parameter.top_p",
    ),
    "five stop strings": (
        pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop=list("abcde"))),
        "invalid_parameter.stop",
    ),
    "tool_choice names an unknown function": (
        pb.GenerateRequest(
            chat=pb.ChatInput(
                messages=[pb.ChatMessage(role="user", content=[text("hi")])],
                tools=[pb.Tool(name="get_weather")],
                tool_choice=pb.ToolChoice(mode=pb.ToolChoice.NAMED, function_name="get_time"),
            )
        ),
        "invalid_parameter.tool_choice",
    ),
    "max_tokens past the context": (
        pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=MAX_MODEL_LEN)),
        "max_tokens_exceeded",
    ),
    "prompt too long": (
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * (MAX_MODEL_LEN + 4))),
        "context_length_exceeded",
    ),
    "unknown role": (
        pb.GenerateRequest(
            chat=pb.ChatInput(messages=[pb.ChatMessage(role="robot", content=[text("hi")])])
        ),
        "invalid_messages",
    ),
    "three images": (
        chat(*(image(png((i * 40, 0, 0))) for i in range(3)), text("?")),
        "too_many_images",
    ),
    "corrupt second image": (
        chat(image(png((0, 90, 0))), image(b"not an image at all"), text("?")),
        "invalid_image: item 1",
    ),
    "loopback url": (
        chat(pb.ContentPart(image=pb.ImageInput(url="http://127.0.0.1:9/a.png")), text("?")),
        "invalid_image: item 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_invalid_argument_with_the_reason(service, case):
    decoder, client, _ = service
    request, reason = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        collect(client.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(reason)
    assert "0x" not in err.value.details()  # no reprs or addresses leak out
    fine = pb.GenerateRequest(prompt="still fine?", sampling=pb.SamplingParams(max_tokens=4))
    ids, _, _ = collect(client.Generate(fine, timeout=30))
    assert ids
    assert wait_for(lambda: engine_idle(decoder))


def test_images_are_served_although_one_encoder_address_is_dead(service):
    _, client, _ = service
    for i in range(4):
        request = chat(image(png((10 * i, 200, 30))), text("Colour?"), max_tokens=3)
        ids, _, _ = collect(client.Generate(request, timeout=30))
        assert ids


def test_client_cancel_and_deadline_abort_and_free_the_kv_cache(slow_service):
    decoder, client, metrics_port = slow_service
    engine = decoder.runtime.loop.engine
    aborted = metric(metrics_port, "vlm:num_aborted_requests_total")
    call = client.Generate(long_request(), timeout=60)
    next(call)
    assert engine.stats().kv_usage > 0
    call.cancel()
    assert wait_for(lambda: engine_idle(decoder))
    with pytest.raises(grpc.RpcError) as err:
        collect(client.Generate(long_request(), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: engine_idle(decoder))
    assert wait_for(lambda: metric(metrics_port, "vlm:num_aborted_requests_total") >= aborted + 2)
    assert metric(metrics_port, "vlm:kv_cache_usage_perc") == 0


def test_abort_by_id_ends_the_stream_with_abort(slow_service):
    decoder, client, _ = slow_service
    call = client.Generate(long_request("job-7"), timeout=60)
    next(call)
    assert client.Abort(pb.AbortRequest(request_id="job-7"), timeout=5).found
    _, _, last = collect(call)
    assert last.finish_reason == pb.ABORT
    assert not client.Abort(pb.AbortRequest(request_id="job-7"), timeout=5).found
    assert wait_for(lambda: engine_idle(decoder))


def test_a_request_id_in_flight_cannot_be_reused(slow_service):
    decoder, client, _ = slow_service
    call = client.Generate(long_request("twice"), timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        collect(client.Generate(long_request("twice"), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("invalid_parameter.request_id")
    _, _, last = collect(call)  # the first request is untouched by the refused one
    assert last.finish_reason == pb.LENGTH
    assert wait_for(lambda: engine_idle(decoder))


def test_a_full_queue_answers_resource_exhausted(slow_service):
    decoder, client, _ = slow_service
    limit = decoder.runtime.max_active
    decoder.runtime.max_active = 1
    try:
        call = client.Generate(long_request(), timeout=60)
        next(call)
        with pytest.raises(grpc.RpcError) as err:
            collect(client.Generate(pb.GenerateRequest(prompt="me too"), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details().startswith("queue_full")
        call.cancel()
    finally:
        decoder.runtime.max_active = limit
    assert wait_for(lambda: engine_idle(decoder))


def test_decoder_command_with_tp_2_answers_like_one_process(service, tiny_ckpt_45, tmp_path):
    _, client, _ = service
    port = free_port()
    cmd = [sys.executable, "-m", "glimpse.cli", "decoder", "--model-path", str(tiny_ckpt_45)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--tp", "2", "--device", "cpu"]
    cmd += ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--num-blocks", "128"]
    cmd += ["--shutdown-drain-s", "0", "--shutdown-grace-s", "1"]
    log = tmp_path / "decoder.log"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_for(lambda: _serving(port) or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, log.read_text()
        request = pb.GenerateRequest(
            prompt="Two ranks", sampling=pb.SamplingParams(temperature=0, max_tokens=8)
        )
        expected, _, _ = collect(client.Generate(request, timeout=30))
        got, _, _ = collect(stub(port).Generate(request, timeout=30))
        assert got == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()


def _serving(port: int) -> bool:
    try:
        return health(port) == "SERVING"
    except grpc.RpcError:
        return False
