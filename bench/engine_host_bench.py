"""Engine host-time benchmark: milliseconds of host work per step at large batch, model stubbed.

``python -m bench.engine_host_bench [--batch-sizes 1,32,128,256] [--prompt-len 1000]
[--image-tokens 256] [--output-len 128] [--mixed-running 128] [--loop-batch 128]
[--loop-device-ms 15] [--profile 128] [--skip-loop] [--clock wall|thread] [--detok bytes|decode]``

The real ``LLMEngine`` runs on the CPU with the model replaced by ``StubModel``: it returns
correctly shaped hidden states and logits at once (the next token is a hash of the input token
and its position, so outputs vary and detokenising does real work), so every millisecond
measured is the engine's own host work. Requests: ``--prompt-len``-token prompts of random text
tokens with a ``--image-tokens`` image placeholder span (embeddings given, 3-D positions and a
rope delta like a real image prompt), greedy, ``ignore_eos``, ``--output-len`` tokens each,
detokenised with the tiny checkpoint's tokenizer: from its per-id byte table, as the engine does
for a ByteLevel decoder (``--detok bytes``), or by ``tokenizer.decode`` windows (``--detok decode``,
the path any other decoder takes), to compare the two in one tree. Cases:

- decode at each batch size: the batch is admitted and prefilled, then every decode step until
  the last request finishes is timed (the last step builds the finishing outputs too);
- mixed: ``--mixed-running`` requests decode while one new request arrives per step (the steady
  state of 20 req/s at ~50 ms a step), the new prompts prefilled in chunks under the 8192-token
  budget;
- burst: ``--mixed-running`` requests decode and 64 new requests arrive at once, so the next
  steps are budget-bound chunked prefills next to the decodes;
- loop: the same engine inside the service's ``EngineLoop`` (engine thread) with one asyncio
  consumer per request draining its ``RequestStream`` and building the ``GenerateResponse``
  like the servicer (``convert.response``); each step also sleeps ``--loop-device-ms`` to stand
  in for the GPU (the sleep releases the GIL, as waiting for a CUDA step does), so the host's
  share is the step time above that.

Phases, timed with ``time.perf_counter`` by wrapping the engine's calls from here (nothing in
the engine is instrumented): schedule (``Scheduler.schedule``), prepare (``ModelRunner.
prepare_inputs``), launch (the rest of ``launch``: runner state and the sampler's launch, with its
argmax over the [B, 1088] logits; the stub model's own time is taken out), result
(``PendingStep.result``: picks to host, per-request dicts), update
(``Scheduler.update_from_output``), outputs (``LLMEngine._outputs``: detokenising, stop strings,
``RequestOutput``s) and total (the whole ``step()`` less the stub model). ``--profile B`` prints
a cProfile of the decode steps at batch B. The table prints last. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from decoder_service import convert
from decoder_service.engine import model_runner
from decoder_service.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from decoder_service.engine.engine import LLMEngine
from decoder_service.engine.request import MediaItem
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine_loop import EngineLoop, EngineRequest
from decoder_service.token_text import TokenText
from models.glm4v.config import ModelConfig, load_model_config
from models.glm4v.tiny import write_tiny_checkpoint

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
PHASES = ("schedule", "prepare", "launch", "result", "update", "outputs", "total")
TEXT_TOKENS = (256, 1024)  # the tiny tokenizer's merged text tokens (no bytes, no specials)


class StubModel(torch.nn.Module):
    """Instant stand-in for the decoder: hidden state = the next token id, logits one-hot."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.seconds = 0.0  # spent in forward / compute_logits: device work on a GPU
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # device and dtype for the runner
        self.vocab_size = vocab_size

    def forward(self, input_ids, positions, meta, mm_embeds=None, mm_mask=None):
        start = time.thread_time()
        lo, hi = TEXT_TOKENS
        pos = positions[0] if positions.dim() == 2 else positions
        nxt = (input_ids * 31 + pos * 17) % (hi - lo) + lo
        self.seconds += time.thread_time() - start
        return nxt[:, None]  # [T, 1] int64

    def compute_logits(self, hidden, out=None):  # [N, 1] int64 -> [N, V] float32
        start = time.thread_time()
        logits = torch.zeros(hidden.shape[0], self.vocab_size).scatter_(1, hidden, 1.0)
        self.seconds += time.thread_time() - start
        return logits


class PhaseTimer:
    """Per-step seconds by phase, gathered by wrapping engine methods (see the module doc)."""

    def __init__(self, engine: LLMEngine, clock=time.perf_counter) -> None:
        self.engine = engine
        self.clock = clock
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._undo: list = []
        sched, runner = engine.scheduler, engine.runner
        self._wrap(sched, "schedule", "schedule")
        self._wrap(runner, "prepare_inputs", "prepare")
        self._wrap(runner, "launch", "launch")
        runner.model.seconds = 0.0
        self._wrap(sched, "update_from_output", "update")
        self._wrap(engine, "_outputs", "outputs")
        result = model_runner.PendingStep.result
        model_runner.PendingStep.result = self._timed(result, "result")
        self._undo.append(lambda: setattr(model_runner.PendingStep, "result", result))

    def _timed(self, fn, phase: str):
        current, clock = self.current, self.clock

        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                current[phase] += clock() - start

        return timed

    def _wrap(self, obj, name: str, phase: str) -> None:
        setattr(obj, name, self._timed(getattr(obj, name), phase))
        self._undo.append(lambda: delattr(obj, name))

    def step(self):
        start = self.clock()
        outputs = self.engine.step()
        cur = self.current
        cur["total"] = self.clock() - start
        model = self.engine.runner.model
        cur["launch"] -= cur["prepare"] + model.seconds  # both run inside launch
        cur["total"] -= model.seconds
        model.seconds = 0.0
        self.steps.append(dict(cur))
        cur.clear()
        return outputs

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()


def build_engine(
    ckpt: Path, model_config: ModelConfig, max_running: int, max_len: int, freeze: bool, detok: str
):
    config = EngineConfig(
        cache=CacheConfig(num_blocks=max_running * (max_len // 16 + 2)),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=8192, max_running_requests=max_running, max_model_len=max_len
        ),
    )
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    model = StubModel(model_config.text.vocab_size)
    engine = LLMEngine(model, model_config, config, tok)
    if detok == "decode":  # as for a tokenizer without a ByteLevel decoder
        engine._token_bytes = None
    if freeze:  # as the decoder server does once warm (server.py)
        gc.collect()
        gc.freeze()
    return engine, tok


class Workload:
    """Prompts with one image span, all distinct (no prefix-cache hits)."""

    def __init__(self, model_config: ModelConfig, args: argparse.Namespace) -> None:
        self.cfg, self.args = model_config, args
        self.rng = np.random.default_rng(0)
        self.params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        self.count = 0

    def request(self) -> EngineRequest:
        a, n_img = self.args, self.args.image_tokens
        prompt = self.rng.integers(*TEXT_TOKENS, a.prompt_len).tolist()
        items, positions, delta = [], None, 0
        if n_img:
            offset = 16
            prompt[offset : offset + n_img] = [self.cfg.image_token_id] * n_img
            embeds = torch.zeros(n_img, self.cfg.text.hidden_size)
            items = [MediaItem.contiguous(f"img{self.count}", offset, n_img, embeds)]
            side = int(n_img**0.5)
            pos = np.arange(a.prompt_len)[None].repeat(3, 0)
            grid = np.arange(n_img)
            pos[1, offset : offset + n_img] = offset + grid // side
            pos[2, offset : offset + n_img] = offset + grid % side
            pos[0, offset : offset + n_img] = offset
            shrink = n_img - max(side, n_img // side)
            pos[:, offset + n_img :] -= shrink
            positions, delta = torch.from_numpy(pos), -shrink
        self.count += 1
        return EngineRequest(f"r{self.count}", prompt, self.params, items, positions, delta)

    def add(self, engine: LLMEngine) -> None:
        r = self.request()
        engine.add_request(
            r.request_id, r.prompt_token_ids, r.params, r.mm_items, r.mrope_positions, r.rope_delta
        )


def prefilled(engine: LLMEngine) -> bool:
    s = engine.scheduler
    return not s.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens for r in s.running)


def run_decode(engine, work, batch: int, clock, prof: cProfile.Profile | None) -> list[dict]:
    for _ in range(batch):
        work.add(engine)
    while not prefilled(engine):
        engine.step()
    timer = PhaseTimer(engine, clock)
    if prof is not None:
        prof.enable()
    while engine.has_unfinished_requests:
        timer.step()
    if prof is not None:
        prof.disable()
    timer.close()
    return timer.steps


def run_mixed(engine, work, running: int, arrivals: int, steps: int, clock) -> list[dict]:
    """``running`` decode while ``arrivals`` requests arrive per step (or all at once: burst)."""
    for _ in range(running):  # staggered starts: outputs end one step apart
        work.add(engine)
        engine.step()
    while not prefilled(engine):
        engine.step()
    timer = PhaseTimer(engine, clock)
    if arrivals:
        for _ in range(steps):
            for _ in range(arrivals):
                work.add(engine)
            timer.step()
    else:  # a burst of 64 requests: time the steps until they are all prefilled
        for _ in range(64):
            work.add(engine)
        while not prefilled(engine):
            timer.step()
    timer.close()
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    engine.step()
    return timer.steps


def run_loop(engine, tok, work, batch: int, device_ms: float) -> dict[str, list[float]]:
    """EngineLoop + one consumer per request building responses, device time emulated."""
    token_text = TokenText(tok)
    step = engine.step
    step_times: list[float] = []

    def device_step():
        time.sleep(device_ms / 1e3)
        start = time.perf_counter()
        out = step()
        step_times.append(time.perf_counter() - start)
        return out

    engine.step = device_step
    gaps: list[float] = []

    async def consume(loop: EngineLoop, request: EngineRequest) -> None:
        stream = await loop.submit(request)
        last = None
        while not stream.finished:
            chunk = await stream.next()
            convert.response(chunk, token_text).SerializeToString()
            now = time.perf_counter()
            if last is not None and chunk.token_ids:
                gaps.append((now - last) / len(chunk.token_ids))
            last = now

    async def main() -> float:
        loop = EngineLoop(engine, lambda t, skip: tok.decode([t], skip_special_tokens=skip))
        loop.start()
        start = time.perf_counter()
        await asyncio.gather(*(consume(loop, work.request()) for _ in range(batch)))
        wall = time.perf_counter() - start
        await loop.stop()
        return wall

    wall = asyncio.run(main())
    del engine.step
    assert threading.active_count() >= 1
    return {"step": step_times, "gap": gaps, "wall": [wall]}


def stats(values: list[float]) -> tuple[float, float, float]:
    a = np.array(values) * 1e3
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def phase_rows(case: str, steps: list[dict]) -> list[str]:
    rows = []
    for phase in PHASES:
        mean, p50, p99 = stats([s.get(phase, 0.0) for s in steps])
        rows.append(f"{case:<22} {phase:<9} {mean:>8.3f} {p50:>8.3f} {p99:>8.3f}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,32,128,256")
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--mixed-running", type=int, default=128)
    parser.add_argument("--mixed-steps", type=int, default=128)
    parser.add_argument("--loop-batch", type=int, default=128)
    parser.add_argument("--loop-device-ms", type=float, default=15.0)
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave the heap unfrozen (the server freezes it once warm)",
    )
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval for the loop"
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="phase clock: wall (perf_counter) or thread (CPU time of the engine thread, blind "
        "to other processes on a shared machine)",
    )
    parser.add_argument(
        "--detok",
        choices=("bytes", "decode"),
        default="bytes",
        help="detokenise from the byte table (the engine's choice here) or by tokenizer.decode",
    )
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per batch size")
    parser.add_argument("--profile", type=int, default=0, help="cProfile the decode at batch B")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = CLOCKS[args.clock]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    max_len = args.prompt_len + args.output_len + 8
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, variant="glm4.5v")
        model_config = load_model_config(ckpt)
        work = Workload(model_config, args)
        for b in sizes:
            engine, _ = build_engine(
                ckpt, model_config, max(b, 1), max_len, args.gc_freeze, args.detok
            )
            prof = cProfile.Profile() if args.profile == b else None
            steps = []
            for _ in range(args.repeats):
                steps += run_decode(engine, work, b, clock, prof)
            rows += phase_rows(f"decode b={b}", steps)
            if prof is not None:
                print(f"--- cProfile, decode steps at batch {b} ---")
                for sort in ("tottime", "cumtime"):
                    pstats.Stats(prof).sort_stats(sort).print_stats(30)
        r = args.mixed_running
        engine, _ = build_engine(ckpt, model_config, 2 * r, max_len, args.gc_freeze, args.detok)
        rows += phase_rows(
            f"mixed {r}+1/step", run_mixed(engine, work, r, 1, args.mixed_steps, clock)
        )
        rows += phase_rows(f"burst {r}+64", run_mixed(engine, work, r, 0, 0, clock))
        loop_rows = []
        if not args.skip_loop:
            engine, tok = build_engine(
                ckpt, model_config, args.loop_batch, max_len, args.gc_freeze, args.detok
            )
            if args.switch_interval is not None:
                sys.setswitchinterval(args.switch_interval)
            res = run_loop(engine, tok, work, args.loop_batch, args.loop_device_ms)
            name = f"loop b={args.loop_batch}"
            n_tok = args.loop_batch * args.output_len
            mean, p50, p99 = stats(res["step"])
            loop_rows.append(f"{name:<22} {'step':<9} {mean:>8.3f} {p50:>8.3f} {p99:>8.3f}")
            mean, p50, p99 = stats(res["gap"])
            loop_rows.append(f"{name:<22} {'per-token':<9} {mean:>8.3f} {p50:>8.3f} {p99:>8.3f}")
            wall = res["wall"][0]
            loop_rows.append(
                f"{name:<22} wall {wall:.2f} s for {n_tok} tokens, {len(res['step'])} steps: "
                f"{wall / len(res['step']) * 1e3:.2f} ms a step incl. {args.loop_device_ms} ms "
                f"emulated device time"
            )
    print(
        f"\nengine host ms per step (CPU, torch threads 1, {args.clock} clock, {args.detok} "
        f"detok); prompts {args.prompt_len} tokens "
        f"({args.image_tokens} image), {args.output_len} output tokens, greedy, ignore_eos, "
        "detokenised"
    )
    print(f"{'case':<22} {'phase':<9} {'mean':>8} {'p50':>8} {'p99':>8}")
    print("\n".join(rows))
    if loop_rows:
        print("loop: engine step() time (device sleep excluded) and consumer time per token")
        print("\n".join(loop_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
