"""Generation where the user waits: both Compare panes streaming, the first token, batch A/B of 122 prompts.

    python benchmarks/generation_speed.py              # the measurement (CUDA): about 3 minutes on an H200
    python benchmarks/generation_speed.py --cpu-smoke  # this script end to end on a tiny model, on the CPU

No download, no network: two random-init models of the real Qwen2.5-0.5B-Instruct
architecture (config below, bf16) stand for base and tuned. The tokenizer is a
byte-level BPE with Qwen's special tokens and chat template trained on the bundled
sample (`models.train_chat_tokenizer`); the prompts are the sample's instructions
in that template. Its vocabulary is 3,000 wide, so the text shown is the answer's
ids folded into it: tokens/s do not depend on the tokenizer. Every run decodes
exactly max_new_tokens (no end ids), so the token counts are fixed. In one process:
  chat, ours   both panes in one loop (`decoding.advance_together`, what `generation.stream_pair`
               runs): cold = the first answer right after the models load, while their captured
               steps are built in the background; then warm (median of 3)
  chat, old    two threads each running `generate` with a TextIteratorStreamer and the dynamic
               cache, a pump thread per pane and the caller reading both (the code this replaced)
  A/B, ours    122 prompts x 151 tokens x 2 models in length-sorted batches (`decoding.answer_in_batches`):
               first call (captures included), then again
  A/B, old     one prompt at a time, base then tuned, `generate`: a few prompts timed, extrapolated to 122
Prints a table, the lines chat_tok_s_per_pane= first_token_ms= ab_122_s=, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ruozhi_ui.config import DEFAULT_SYSTEM_PROMPT, REFERENCE_PROMPTS, GenConfig  # noqa: E402
from ruozhi_ui.data import SAMPLE_DIR  # noqa: E402
from ruozhi_ui.decoding import (Decoder, IncrementalText, advance_together, answer_in_batches,  # noqa: E402
                                chat_prompt_ids, resolve_settings)
from ruozhi_ui.decoding.chat import open_batches  # noqa: E402
from ruozhi_ui.decoding.runners import StaticRunner  # noqa: E402
from ruozhi_ui.models import train_chat_tokenizer  # noqa: E402

# Qwen2.5-0.5B-Instruct's published hyper-parameters.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                  use_sliding_window=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
TINY = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=4096, max_position_embeddings=2048)
FULL = dict(config=QWEN25_05B, max_new_tokens=151, ab_prompts=122, old_ab_prompts=8, warm_reps=3)
SMOKE = dict(config=TINY, max_new_tokens=8, ab_prompts=10, old_ab_prompts=2, warm_reps=1)
TARGETS = dict(chat_tok_s_per_pane=200, first_token_ms=150, ab_122_s=15)  # issue #15, on an H200


def build_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: no 0.5B random init on the CPU
        model = Qwen2ForCausalLM(Qwen2Config(**config))
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


def sample_instructions() -> list[str]:
    records = [r for name in ("train.json", "val.json")
               for r in json.loads((SAMPLE_DIR / name).read_text(encoding="utf-8"))]
    return [(r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip() for r in records]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- chat: both panes streaming

def chat_ours(decoders, tokenizer, ids: list[int], settings) -> dict:
    """Both panes in one loop, exactly as `stream_texts` drives them (the text is the ids folded into the
    tokenizer's vocabulary). Times per pane: first token and whole answer, from the call."""
    width = len(tokenizer)
    t0 = time.perf_counter()
    batches = open_batches([(d, [ids], settings) for d in decoders], build_now=False)
    static = "captured" if decoders[0].capture else "static"
    paths = [static if isinstance(b.runner, StaticRunner) else "simple" for b in batches]
    texts = [IncrementalText(tokenizer) for _ in decoders]
    first, last, counts = [None] * len(decoders), [None] * len(decoders), [0] * len(decoders)
    for grown in advance_together(batches):
        now = time.perf_counter()
        for i, rows in enumerate(grown):
            if rows:
                texts[i].add(batches[i].tokens[0][-1] % width)
                counts[i] += 1
                first[i] = first[i] or now
                last[i] = now
    paths = [p if b.switched_at is None else f"{p}>{static}@{b.switched_at}" for p, b in zip(paths, batches)]
    return pane_numbers(t0, first, last, counts) | {"path": "+".join(paths)}


def pane_numbers(t0: float, first: list, last: list, counts: list) -> dict:
    return {"first_token_ms": 1000 * (max(first) - t0),  # both panes show a token
            "tok_s_per_pane": min(n / (end - t0) for n, end in zip(counts, last)),  # whole answer, first token included
            "decode_tok_s_per_pane": min((n - 1) / (end - start) for n, start, end in zip(counts, first, last)),
            "tokens_per_pane": min(counts)}


def chat_old(models, tokenizer, ids: list[int], max_new_tokens: int, device) -> dict:
    """The replaced code's shape: per pane a generate() thread feeding a TextIteratorStreamer, a pump thread
    reading it into one queue, and the caller reading the queue."""
    from transformers import TextIteratorStreamer

    class TimedStreamer(TextIteratorStreamer):
        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.times.append(time.perf_counter())
            super().put(value)

    x = torch.tensor([ids], device=device)
    updates: queue.Queue = queue.Queue()
    streamers = []
    t0 = time.perf_counter()
    threads = []
    for i, model in enumerate(models):
        streamer = TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.times = []
        streamers.append(streamer)
        kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
        threads.append(threading.Thread(target=model.generate, kwargs=kwargs))
        threads.append(threading.Thread(target=lambda s=streamer, i=i: [updates.put((i, t)) for t in s]
                                        + [updates.put((i, None))]))
    for t in threads:
        t.start()
    running = len(models)
    while running:
        _, text = updates.get()
        running -= text is None
    for t in threads:
        t.join()
    return pane_numbers(t0, [s.times[0] for s in streamers], [s.times[-1] for s in streamers],
                        [len(s.times) for s in streamers]) | {"path": "2 threads, generate()"}


# ---------------------------------------------------------------- batch A/B

def ab_ours(decoders, tokenizer, prompt_ids: list[list[int]], settings, device) -> dict:
    jobs = [(d, tokenizer, settings) for d in decoders]
    t0 = time.perf_counter()
    first_rows, rows = None, 0
    for indices, _ in answer_in_batches(jobs, [prompt_ids] * len(decoders)):
        rows += len(indices)
        first_rows = first_rows or time.perf_counter() - t0
    sync(device)
    return {"s": time.perf_counter() - t0, "first_rows_s": first_rows, "rows": rows}


def ab_old(models, prompt_ids: list[list[int]], max_new_tokens: int, device) -> float:
    """Seconds for these prompts the replaced way: one at a time, base then tuned."""
    t0 = time.perf_counter()
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        for model in models:
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- main

def environment(device: torch.device) -> dict:
    import transformers

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: checks this script")
    args = parser.parse_args()
    plan = SMOKE if args.cpu_smoke else FULL
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("this measurement needs a CUDA GPU; --cpu-smoke runs the script on a tiny model on the CPU")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    static = True if args.cpu_smoke else None  # the CPU smoke runs the static slots too (eagerly)
    n_new = plan["max_new_tokens"]
    env = environment(device)
    print(f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}", file=sys.stderr)

    t_build = time.perf_counter()
    tokenizer = train_chat_tokenizer(sample_instructions())
    models = [build_model(plan["config"], device, dtype, seed) for seed in (0, 1)]
    sync(device)
    build_s = time.perf_counter() - t_build
    instructions = sample_instructions()
    ab_prompts = [chat_prompt_ids(tokenizer, instructions[i % len(instructions)], (), DEFAULT_SYSTEM_PROMPT)
                  for i in range(plan["ab_prompts"])]
    chat_prompt = chat_prompt_ids(tokenizer, REFERENCE_PROMPTS[0], (), DEFAULT_SYSTEM_PROMPT)
    settings = resolve_settings(models[0], tokenizer, GenConfig(max_new_tokens=n_new, eos_token_ids=()))

    # Ours, as the app runs it: a Decoder per model, its warm-up started at load (ModelCache does this).
    decoders = [Decoder(m, static=static) for m in models]
    for d in decoders:
        d.start_warm_up()
    cold = chat_ours(decoders, tokenizer, chat_prompt, settings)
    print(f"chat cold: {cold}", file=sys.stderr, flush=True)
    for d in decoders:
        d.wait_warm_up()
    warm_runs = [chat_ours(decoders, tokenizer, chat_prompt, settings) for _ in range(plan["warm_reps"])]
    warm = {k: statistics.median(r[k] for r in warm_runs) for k in ("first_token_ms", "tok_s_per_pane",
                                                                   "decode_tok_s_per_pane")}
    warm["path"] = warm_runs[-1]["path"]
    print(f"chat warm: {warm}", file=sys.stderr, flush=True)
    ab_first = ab_ours(decoders, tokenizer, ab_prompts, settings, device)
    ab_again = ab_ours(decoders, tokenizer, ab_prompts, settings, device)
    print(f"A/B ours: {ab_first} then {ab_again}", file=sys.stderr, flush=True)

    # The replaced way, same models, same prompts.
    old_chat = chat_old(models, tokenizer, chat_prompt, n_new, device)
    print(f"chat old: {old_chat}", file=sys.stderr, flush=True)
    few = ab_prompts[:plan["old_ab_prompts"]]
    old_ab_s = ab_old(models, few, n_new, device) * len(ab_prompts) / len(few)
    print(f"A/B old (estimated from {len(few)} prompts): {old_ab_s:.1f} s", file=sys.stderr, flush=True)

    lengths = [len(p) for p in ab_prompts]
    print(f"\n{'Qwen2.5-0.5B architecture' if not args.cpu_smoke else 'tiny Qwen2 (smoke)'}, random init, "
          f"{str(dtype).removeprefix('torch.')}, on {env['device']}; {n_new} new tokens per answer, end ids off; "
          f"prompts {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}); models built in "
          f"{build_s:.1f} s")
    print(f"{'run':<34} {'tok/s/pane':>10} {'decode tok/s':>12} {'first ms':>9}  path")
    for name, r in (("chat, ours, cold (1st after load)", cold), ("chat, ours, warm (median)", warm),
                    ("chat, old (2 generate threads)", old_chat)):
        print(f"{name:<34} {r['tok_s_per_pane']:>10.1f} {r['decode_tok_s_per_pane']:>12.1f} "
              f"{r['first_token_ms']:>9.1f}  {r['path']}")
    n_ab = len(ab_prompts)
    print(f"{'A/B':<34} {'seconds':>10} {'first rows s':>12}")
    print(f"{f'A/B {n_ab} x {n_new} x 2, ours, 1st call':<34} {ab_first['s']:>10.2f} {ab_first['first_rows_s']:>12.2f}")
    print(f"{f'A/B {n_ab} x {n_new} x 2, ours, again':<34} {ab_again['s']:>10.2f} {ab_again['first_rows_s']:>12.2f}")
    print(f"{f'A/B {n_ab} x {n_new} x 2, old (from {len(few)})':<34} {old_ab_s:>10.1f}")
    summary = {
        "chat_tok_s_per_pane": round(warm["tok_s_per_pane"], 1),
        "first_token_ms": round(warm["first_token_ms"], 1),
        "ab_122_s": round(ab_first["s"], 2),
        "chat_tok_s_per_pane_cold": round(cold["tok_s_per_pane"], 1),
        "first_token_ms_cold": round(cold["first_token_ms"], 1),
        "chat_path_cold": cold["path"], "chat_path_warm": warm["path"],
        "decode_tok_s_per_pane": round(warm["decode_tok_s_per_pane"], 1),
        "ab_122_s_again": round(ab_again["s"], 2), "ab_first_rows_s": round(ab_first["first_rows_s"], 2),
        "old_chat_tok_s_per_pane": round(old_chat["tok_s_per_pane"], 1),
        "old_first_token_ms": round(old_chat["first_token_ms"], 1),
        "old_ab_122_s_estimated": round(old_ab_s, 1), "old_ab_prompts_timed": len(few),
        "ab_prompts": n_ab, "max_new_tokens": n_new, "model": "tiny" if args.cpu_smoke else "qwen2.5-0.5b-arch",
        "dtype": str(dtype), **env,
    }
    if not args.cpu_smoke:
        summary["targets_met"] = {"chat_tok_s_per_pane": summary["chat_tok_s_per_pane"] >= TARGETS["chat_tok_s_per_pane"],
                                  "first_token_ms": summary["first_token_ms"] <= TARGETS["first_token_ms"],
                                  "ab_122_s": summary["ab_122_s"] <= TARGETS["ab_122_s"]}
    for key in ("chat_tok_s_per_pane", "first_token_ms", "ab_122_s"):
        print(f"{key}={summary[key]}")
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
