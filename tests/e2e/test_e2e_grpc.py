"""A plain gRPC client calls the decoder directly, without the gateway (any language could).

The stubs come from protos/decoder.proto; the decoder renders the chat template, sends the image
(a file:// URL under the allowed directory) to its encoder and streams token ids that must equal
transformers' greedy ids. Health and reflection answer as documented.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from protos import decoder_pb2 as pb
from protos import decoder_pb2_grpc as pb_grpc

MAX_TOKENS = 8


def channel(system) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{system.decoder_port}")


def test_generate_over_raw_grpc_matches_transformers(system, hf, media_dir):
    picture = media_dir / "picture_2.png"
    expected = hf.greedy(
        [("image", Image.open(picture).convert("RGB")), ("text", "What is this?")], MAX_TOKENS
    )
    request = pb.GenerateRequest(
        request_id="raw-grpc-1",
        chat=pb.ChatInput(
            messages=[
                pb.ChatMessage(
                    role="user",
                    content=[
                        pb.ContentPart(image=pb.ImageInput(url=picture.as_uri())),
                        pb.ContentPart(text="What is this?"),
                    ],
                )
            ]
        ),
        sampling=pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
    )
    with channel(system) as ch:
        responses = list(pb_grpc.DecoderStub(ch).Generate(request, timeout=60))
    ids = [t for r in responses for t in r.token_ids]
    assert ids == expected.token_ids
    last = responses[-1]
    assert last.finish_reason == (pb.STOP if expected.stopped else pb.LENGTH)
    assert last.usage.prompt_tokens == expected.prompt_tokens
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert all(r.token_ids for r in responses[:-1])


def test_prompt_and_token_inputs_agree(system, hf):
    ids = hf.tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    sampling = pb.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with channel(system) as ch:
        stub = pb_grpc.DecoderStub(ch)
        by_text = list(
            stub.Generate(pb.GenerateRequest(prompt="Once upon a time", sampling=sampling))
        )
        by_ids = list(
            stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling))
        )
    out_text = [t for r in by_text for t in r.token_ids]
    assert out_text == [t for r in by_ids for t in r.token_ids]
    assert "".join(r.text for r in by_text) == hf.tokenizer.decode(out_text)


def test_health_and_reflection(system):
    with channel(system) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="glimpse.decoder.v1.Decoder"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "glimpse.decoder.v1.Decoder" in names
    assert "grpc.health.v1.Health" in names
