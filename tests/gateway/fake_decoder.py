"""A scripted decoder gRPC server implementing protos/decoder.proto, for gateway tests.

The fake answers each Generate call from a ``Script`` chosen by the request's *key*: the text of
the last user message (chat) or the prompt string (completions). A script lists the text pieces to
stream (one GenerateResponse each, one fake token per piece), the finish reason, an optional
delay between pieces, and an optional gRPC error raised after some pieces. Every request is
recorded by key, and calls that end because the client cancelled are recorded too, so tests can
assert what reached the decoder and that disconnects abort generation.
Unknown keys stream ``DEFAULT_PIECES``. The server runs on 127.0.0.1 in a thread of the test
process and also serves grpc.health.v1.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import decoder_pb2 as pb
from protos import decoder_pb2_grpc

SERVICE = "glimpse.decoder.v1.Decoder"
MODEL = "glm-4.5v-fake"
MAX_MODEL_LEN = 4096
VOCAB = 151552
MAX_IMAGES = 4
MAX_VIDEOS = 1
DEFAULT_PIECES = ["Hello", " from", " the", " fake", " decoder", "."]


@dataclass
class Script:
    pieces: list[str] = field(default_factory=lambda: list(DEFAULT_PIECES))
    finish_reason: int = pb.STOP
    delay_s: float = 0.0  # before every piece
    error: tuple[grpc.StatusCode, str] | None = None
    error_after: int = 0  # pieces sent before the error
    cached_tokens: int = 0


def key_of(request: pb.GenerateRequest) -> str:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return request.prompt
    if kind == "token_ids":
        return "token_ids"
    users = [m for m in request.chat.messages if m.role == "user"]
    texts = [p.text for p in users[-1].content if p.WhichOneof("part") == "text"] if users else []
    return "".join(texts)


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.requests: dict[str, pb.GenerateRequest] = {}
        self.cancelled: list[str] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self.health = health.HealthServicer()
        self.port = 0

    # --- control -------------------------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        decoder_pb2_grpc.add_DecoderServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        self.set_serving(True)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVICE, status)

    def wait_cancelled(self, key: str, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: key in self.cancelled, timeout=timeout)

    # --- rpcs --------------------------------------------------------------------------------------

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(
            served_model_name=MODEL,
            model_type="glm4v_moe",
            max_model_len=MAX_MODEL_LEN,
            vocab_size=VOCAB,
            modalities=[pb.TEXT, pb.IMAGE, pb.VIDEO],
            limits=pb.Limits(max_images_per_prompt=MAX_IMAGES, max_videos_per_prompt=MAX_VIDEOS),
            eos_token_ids=[151329, 151336, 151338],
        )

    def Abort(self, request, context):
        return pb.AbortResponse(found=False)

    def Generate(self, request, context):
        key = key_of(request)
        self.requests[key] = request
        script = self.scripts.get(key, Script())
        ended = threading.Event()
        context.add_callback(ended.set)
        want_logprobs = request.sampling.logprobs
        for i, piece in enumerate(script.pieces):
            if script.error is not None and i == script.error_after:
                context.abort(*script.error)
            if script.delay_s and ended.wait(script.delay_s):
                with self._cond:
                    self.cancelled.append(key)
                    self._cond.notify_all()
                return
            yield pb.GenerateResponse(
                token_ids=[1000 + i],
                text=piece,
                logprobs=[_logprob(1000 + i, piece, request)] if want_logprobs else [],
            )
        if script.error is not None and script.error_after >= len(script.pieces):
            context.abort(*script.error)
        yield pb.GenerateResponse(
            finish_reason=script.finish_reason,
            usage=pb.Usage(
                prompt_tokens=len(key) + 10,
                completion_tokens=len(script.pieces),
                cached_tokens=script.cached_tokens,
            ),
        )


def _logprob(token_id: int, piece: str, request: pb.GenerateRequest) -> pb.TokenLogprob:
    top = [
        pb.TopLogprob(token_id=token_id + k, token=f"{piece}#{k}", logprob=-0.5 * (k + 1))
        for k in range(request.sampling.top_logprobs)
    ]
    return pb.TokenLogprob(
        token_id=token_id,
        token=piece,
        logprob=-0.25,
        token_bytes=piece.encode("utf-8"),
        top_logprobs=top,
    )
