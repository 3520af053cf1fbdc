"""Checks that need the served model: output length, vocabulary, media counts and modalities.

Run after schema validation and model resolution, before the decoder is called, so cheap
mistakes never reach it. The decoder re-checks what only it can know (prompt length after
template rendering and media expansion) and answers with the reasons in decoder.proto.
Not here: model-independent validation (schemas.py).
"""

from __future__ import annotations

from gateway.convert import ModelInfo
from gateway.errors import GatewayError
from gateway.schemas import ChatCompletionRequest, CompletionRequest


def _bad(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def check_sampling(req: ChatCompletionRequest | CompletionRequest, info: ModelInfo) -> None:
    limit = info.max_model_len
    for param in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, param, None)
        if value is not None and limit and value > limit:
            raise _bad(param, f"{param} must be at most the context length ({limit} tokens)")
    vocab = info.vocab_size
    if vocab and any(t >= vocab for t in req.stop_token_ids or []):
        raise _bad("stop_token_ids", f"stop_token_ids must be below the vocabulary size {vocab}")


def check_chat(req: ChatCompletionRequest, info: ModelInfo) -> None:
    check_sampling(req, info)
    parts = [p for m in req.messages for p in m.content or []]
    for kind, modality, cap in (
        ("image_url", "image", info.max_images_per_prompt),
        ("video_url", "video", info.max_videos_per_prompt),
    ):
        count = sum(p.type == kind for p in parts)
        if count and modality not in info.modalities:
            raise _bad("messages", f"this model does not accept {modality} input")
        if cap and count > cap:
            raise _bad(
                "messages",
                f"at most {cap} {modality}s per request are allowed, got {count}",
                code=f"too_many_{modality}s",
            )


def check_completion(req: CompletionRequest, info: ModelInfo) -> None:
    check_sampling(req, info)
    vocab = info.vocab_size
    if isinstance(req.prompt, list) and vocab and any(t >= vocab for t in req.prompt):
        raise _bad("prompt", f"token ids must be below the vocabulary size {vocab}")
