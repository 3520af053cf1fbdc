"""A small GLM-style tokenizer built from scratch, for tiny test checkpoints.

Contract: ``build_tokenizer()`` trains a byte-level BPE on a fixed built-in corpus with the
``tokenizers`` library and then appends every GLM special token (``GLM_SPECIAL_TOKENS``, in the
order of the real GLM-4.5V / GLM-4.6V vocabulary) as a single-id special token. The result is the
same on every call and in every process, so checkpoints written from it are byte-reproducible.
``write_tokenizer_files(out_dir, chat_template)`` saves ``tokenizer.json`` and a
``tokenizer_config.json`` that transformers loads as a ``PreTrainedTokenizerFast``.

Not here: model weights and configs (``tiny.py``), the chat template text (``chat_template.jinja``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Ordered exactly as in the GLM-4.5V / GLM-4.6V vocabulary (ids 151329..151364 there).
GLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
)

EOS_TOKEN = "<|endoftext|>"
# Generation stops on any of these (end of text, the user's turn, a tool result).
STOP_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|user|>", "<|observation|>")

# Target size of the learned BPE part (256 byte symbols + merges), before special tokens.
BPE_VOCAB_SIZE = 1024

# Varied text so the merges cover English words, digits, code, JSON and some CJK bytes.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm red mat.",
    "What is in this image? The picture shows a small house, two trees and a blue sky.",
    "Describe the video in detail. A person walks across the street, then a car drives by.",
    "There is a red square in the top left corner and a green circle near the bottom right.",
    "The answer is 42. Counting from one: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 2025.",
    "Please think step by step before you answer the question about the chart and the table.",
    "The weather today is sunny with a high of 25 degrees and a light wind from the west.",
    "You are a helpful assistant. Answer briefly and say when you are not sure about it.",
    "The model reads images and videos, then writes text. It can also call tools when asked.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    'import json\ndata = {"name": "glimpse", "size": 3}\nprint(json.dumps(data))\n',
    '{"location": "Beijing", "unit": "celsius", "temperature": 21.5, "ok": true}',
    '{"type": "function", "function": {"name": "get_weather", "parameters": {}}}',
    "get_weather(city='Paris') returned: cloudy, 18 degrees, humidity 60 percent.",
    "The bounding box of the dog is [120, 340, 560, 880] in coordinates from 0 to 1000.",
    "First, look at the left side of the image. Second, compare it with the right side.",
    "A video of 12 frames at 2 frames per second lasts about six seconds in total time.",
    "Mixture of experts models route each token to a few experts chosen by a small gate.",
    "Attention lets every token look at the tokens before it; rotary embeddings add order.",
    "She said: \"Hello, world!\" and he replied 'Good morning' with a smile on his face.",
    "Numbers: 0.5, 3.14159, -7, 1e-5, 65536, 151552, 4096, 128, 64, 32, 16, 8, 4, 2.",
    "Questions? Answers! Lists: apples; oranges; bananas -- and (some) [brackets] {too}.",
    "图片里有什么？一只猫坐在窗户旁边。视频中有一个人在跑步。今天天气很好。",
    "请一步一步思考，然后回答问题。这个表格显示了三个月的销售数据。",
    "Le chat est sur la table. Der Hund spielt im Garten. El sol brilla en el cielo azul.",
    "Tokens, words and sentences: the tokenizer splits text into pieces it has seen before.",
    "The server streams tokens back to the client as soon as each one has been sampled.",
    "An image is cut into patches of fourteen pixels, and four patches merge into a token.",
    "Long documents, short notes, emails, reports, stories, poems and recipes all count.",
)


def _training_corpus() -> list[str]:
    # Repetition gives the frequent pairs a clear margin over rare ones.
    return [line for line in _CORPUS for _ in range(4)]


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE and append the GLM special tokens (ids after the BPE part)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(GLM_SPECIAL_TOKENS))
    return tokenizer


def tokenizer_config(chat_template: str) -> dict:
    """``tokenizer_config.json`` contents for a tokenizer saved next to it as tokenizer.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "remove_space": False,
        "model_max_length": 4096,
        "padding_side": "left",
        "extra_special_tokens": list(GLM_SPECIAL_TOKENS[1:]),
        "chat_template": chat_template,
    }


def write_tokenizer_files(out_dir: Path, chat_template: str) -> Tokenizer:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``; return the tokenizer."""
    tokenizer = build_tokenizer()
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n")
    config = tokenizer_config(chat_template)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer
