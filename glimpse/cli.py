"""The ``glimpse`` console script: one entry, one subcommand per service or tool.

Each subcommand lives beside the code it runs, in a module that exposes
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen subcommand's module is
imported, so ``glimpse gateway`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("glimpse.serve", "run an encoder, the decoder and the gateway as local processes"),
    "encoder": ("encoder_service.cli", "run an encoder service replica (vision tower)"),
    "decoder": ("decoder_service.cli", "run the decoder service (LLM engine)"),
    "gateway": ("gateway.cli", "run the OpenAI-compatible REST gateway"),
    "generate": ("decoder_service.generate", "generate offline from a prompt, images and videos"),
    "tiny-model": ("models.glm4v.tiny", "write a tiny random GLM-4V checkpoint in HF format"),
    "bench": ("glimpse.bench", "serving benchmark against a running gateway"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: glimpse COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\nRun `glimpse COMMAND --help` for a command's flags.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from glimpse import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"glimpse: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"glimpse {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
