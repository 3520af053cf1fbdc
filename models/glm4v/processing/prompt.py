"""Chat template rendering for GLM-4.5V / GLM-4.6V checkpoints.

Contract: ``ChatTemplate.from_pretrained(model_dir)`` compiles the checkpoint's own template
(``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``) in a sandboxed jinja2
environment configured as transformers configures it (trim_blocks, lstrip_blocks, loop controls,
``tojson`` = ``json.dumps(ensure_ascii=False)``, ``raise_exception``, ``strftime_now``).
``render(messages, tools, add_generation_prompt, enable_thinking)`` takes OpenAI-style messages:
``content`` is a string or a list of parts ``text`` / ``image`` / ``image_url`` / ``video`` /
``video_url`` (in any message role, including tool results). Media parts reach the template as
``{"type": "image"}`` / ``{"type": "video"}``, tool-call arguments given as a JSON string are parsed
into a mapping, and the media are returned in prompt order as ``MediaRef``s. Every media part must
appear in the rendered text as exactly one ``<|image|>`` / ``<|video|>`` placeholder; text that
itself contains a placeholder is refused (it would misalign the vision embeddings).

Not here: placeholder expansion and tokenisation (``placeholders.py``), fetching media.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.glm4v.errors import ConfigError, GlimpseModelError

IMAGE_PLACEHOLDER = "<|image|>"
VIDEO_PLACEHOLDER = "<|video|>"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_MEDIA_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


class PromptError(GlimpseModelError):
    """The messages cannot be rendered into a prompt (bad structure, template error, placeholders)."""


@dataclass(frozen=True)
class MediaRef:
    """One media part of the conversation, in prompt order."""

    modality: str  # "image" or "video"
    source: Any  # the part's payload as given: a URL string, bytes, a dict, an object
    message_index: int  # which message it came from


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # template output; media appear as single <|image|> / <|video|> placeholders
    media: list[MediaRef]


class _GenerationTag(Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) as a no-op."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"chat template does not compile: {exc}") from exc
        # bos_token / eos_token / ... are visible to the template, as in transformers
        self._special_tokens = dict(special_tokens or {})

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChatTemplate:
        root = Path(model_dir)
        tok_cfg = _read_json(root / "tokenizer_config.json")
        specials = {
            k: v
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(v := tok_cfg.get(k), str)
        }
        return cls(_find_template(root, tok_cfg), specials)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **extra: Any,
    ) -> RenderedPrompt:
        plain, media = normalize_messages(messages)
        variables: dict[str, Any] = {**self._special_tokens, **extra}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            text = self._template.render(
                messages=plain,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise PromptError(f"chat template failed: {exc}") from exc
        placeholders = list(_iter_placeholders(text))
        expected = [m.modality for m in media]
        if placeholders != expected:
            raise PromptError(
                f"the chat template placed {len(placeholders)} media placeholders for "
                f"{len(media)} media parts (media is only allowed where the template renders it)"
            )
        return RenderedPrompt(text=text, media=media)


def normalize_messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Plain JSON-like messages for the template, and the media parts in order."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    plain, media = [], []
    for idx, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise PromptError(f"message {idx} must be an object with a string 'role'")
        out = {k: v for k, v in msg.items() if k not in ("content", "tool_calls")}
        # reasoning may arrive under older names; templates read reasoning_content (as transformers)
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
        out["content"] = _content(msg.get("content"), idx, media)
        if msg.get("tool_calls"):
            out["tool_calls"] = [_tool_call(tc, idx) for tc in msg["tool_calls"]]
        plain.append(out)
    return plain, media


def _content(content: Any, idx: int, media: list[MediaRef]) -> Any:
    if content is None:
        return None
    if isinstance(content, str):
        _check_text(content, idx)
        return content
    if not isinstance(content, list):
        raise PromptError(f"message {idx}: content must be a string or a list of parts")
    parts = []
    for part in content:
        if isinstance(part, str):
            _check_text(part, idx)
            parts.append({"type": "text", "text": part})
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None and isinstance(part, dict):
            kind = next((k for k in ("text", *_MEDIA_TYPES) if k in part), None)
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"message {idx}: a text part needs a string 'text'")
            _check_text(text, idx)
            parts.append({"type": "text", "text": text})
        elif kind in _MEDIA_TYPES:
            modality = _MEDIA_TYPES[kind]
            media.append(MediaRef(modality=modality, source=part.get(kind), message_index=idx))
            # templates test either the type or the presence of the key; give them both
            parts.append({"type": modality, modality: f"<{modality}>"})
        else:
            raise PromptError(f"message {idx}: unsupported content part type {kind!r}")
    return parts


def _tool_call(call: Any, idx: int) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise PromptError(f"message {idx}: tool_calls entries must be objects")
    fn = dict(call.get("function") or call)
    args = fn.get("arguments")
    if isinstance(args, str):
        # OpenAI sends arguments as a JSON string; GLM templates iterate them as a mapping
        try:
            parsed = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            fn["arguments"] = parsed
    out = {k: v for k, v in call.items() if k != "function"}
    out["function"] = fn
    return out


def _check_text(text: str, idx: int) -> None:
    if IMAGE_PLACEHOLDER in text or VIDEO_PLACEHOLDER in text:
        raise PromptError(f"message {idx}: text may not contain the media placeholder tokens")


def _iter_placeholders(text: str):
    pos = 0
    while True:
        i, v = text.find(IMAGE_PLACEHOLDER, pos), text.find(VIDEO_PLACEHOLDER, pos)
        if i < 0 and v < 0:
            return
        if v < 0 or (0 <= i < v):
            yield "image"
            pos = i + len(IMAGE_PLACEHOLDER)
        else:
            yield "video"
            pos = v + len(VIDEO_PLACEHOLDER)


def _find_template(root: Path, tok_cfg: dict[str, Any]) -> str:
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    for source in (_read_json(root / "chat_template.json"), tok_cfg):
        template = source.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    raise ConfigError(f"no chat template in {root}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
