"""Full SFT of Qwen2.5-0.5B: the reference write-up's method vs our engine, same process, same GPU.

    python benchmarks/train_speed.py            # the measurement (CUDA): ~4 minutes on an H100
    python benchmarks/train_speed.py --tiny     # a smoke test of this script on the CPU

No download: the model is the real Qwen2.5-0.5B-Instruct architecture (config below)
with random weights (same FLOPs and memory as the real ones), and the data are
synthetic records whose token lengths follow the reference's measured distribution
(instruction mean 17.7 / p95 32 / max 72; output mean 104.6 / p95 151.6 / max 357),
2,449 train + 153 validation pairs, with answers that follow from their prompts by
a fixed rule, so the loss has something to learn. Runs, in one process:
  1. ours, cold: `ruozhi_ui.engine.train` with its CUDA defaults, first run in the process, on
     empty compile caches (Triton and torch.compile point at a fresh folder)
  2. the reference method, re-implemented from the write-up's description: fp32,
     every example padded to 62 + 151 + 1 tokens with pads between prompt and answer
     and pads as labels, plain AdamW, batch 12, loss read every step, validation and
     a save each epoch
  3. ours, warm: a second run in the same process (what the app's second training run gets)
  4. ours, warm in a new process: the on-disk compile cache only (what relaunching the app gets)
Both final models are scored with the same correct objective (label tokens only).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from ruozhi_ui.data import Record  # noqa: E402
from ruozhi_ui.encoding import IGNORE_INDEX, collate_padded, encode_record  # noqa: E402
from ruozhi_ui.events import EvalDone, ListSink, StepLogged  # noqa: E402
from ruozhi_ui.train.loss import batch_loss_sum, label_positions  # noqa: E402
from ruozhi_ui.models import train_chat_tokenizer  # noqa: E402

# Qwen2.5-0.5B-Instruct's published hyper-parameters.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")
TINY = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
CONTENT_WORDS = 2000  # words the synthetic text uses; the model's 151,936-wide head is still computed
SYSTEM_WORDS = 6  # makes the chat template cost 19 tokens, as Qwen2.5's does with 你是一个有帮助的助手
MAX_SOURCE, MAX_TARGET, BATCH, EPOCHS, LR = 62, 151, 12, 3, 1e-4


# ---- synthetic workspace --------------------------------------------------------------
def lognormal_lengths(rng: random.Random, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    return [min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def word(i: int) -> str:
    """Letters only: the byte-level pre-tokenizer splits digits from letters, letters stay one piece."""
    return "".join(chr(97 + (i // 26 ** k) % 26) for k in range(3))


def synthetic_records(n: int, seed: int) -> list[dict]:
    """Lognormal lengths fitted to the reference's mean and p95; answers derived from prompts."""
    rng = random.Random(seed)
    # median, sigma solved from mean = m*exp(s^2/2) and p95 = m*exp(1.645 s)
    instr_len = lognormal_lengths(rng, n, 16.27, 0.41, 1, 72)
    out_len = lognormal_lengths(rng, n, 101.6, 0.243, 13, 357)
    out_len[out_len.index(max(out_len))] = 357  # the reference's longest answer
    records = []
    for a, b in zip(instr_len, out_len):
        words = [rng.randrange(CONTENT_WORDS) for _ in range(a)]
        answer = [(words[i % a] * 7 + i) % CONTENT_WORDS for i in range(b)]  # a rule the model can learn
        records.append({"instruction": " ".join(map(word, words)), "input": "", "output": " ".join(map(word, answer))})
    return records


def build_workspace(root: Path, model_kwargs: dict, n_train: int, n_val: int, device: torch.device) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    records = synthetic_records(n_train + n_val, seed=1)
    system = " ".join(map(word, range(SYSTEM_WORDS)))
    # Byte-level BPE like Qwen's, with room for every " abc" word to become one token.
    texts = [system] + [r["instruction"] for r in records] + [r["output"] for r in records]
    texts += ["system\n", "user\n", "assistant\n", "\n"] * 1000  # the chat template's words, one token each
    tok = train_chat_tokenizer(texts, vocab_size=CONTENT_WORDS * 3 + 600)
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    config = Qwen2Config(**model_kwargs, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    del model
    data = root / "data.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    return {"model": str(model_dir), "data": str(data), "system": system, "val_fraction": n_val / (n_train + n_val)}


# ---- the correct objective, for scoring both models alike ----------------------------------
@torch.no_grad()
def correct_loss(model, examples, pad_id: int, device) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), BATCH):
        batch = collate_padded(examples[start:start + BATCH], pad_id)
        batch["positions"], batch["targets"] = label_positions(batch.pop("labels"))
        batch = {k: v.to(device) for k, v in batch.items()}
        total += batch_loss_sum(model, batch).item()
        count += batch["targets"].numel()
    return total / count


def score(model, ws: dict, device) -> tuple[float, float]:
    """(train loss on the first 500 train records, validation loss), label tokens only, fp32."""
    from transformers import AutoTokenizer

    from ruozhi_ui.data import load_source

    tok = AutoTokenizer.from_pretrained(ws["model"])
    splits = load_source(ws["data"], ws["val_fraction"], seed=42)
    enc = lambda rs: [encode_record(tok, r, ws["system"], MAX_SOURCE, MAX_TARGET) for r in rs]
    model = model.float().eval()
    return (correct_loss(model, enc(splits.train[:500]), tok.pad_token_id, device),
            correct_loss(model, enc(splits.val), tok.pad_token_id, device))


# ---- (a) the reference method -------------------------------------------------------------------
def reference_encode(tok, record: Record, system: str):
    """As the write-up does it: pad the prompt to 62 and the answer to 151, pads labelled, a pad at the end."""
    prompt = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": record.instruction}],
                                     tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False, max_length=MAX_SOURCE, padding="max_length", truncation=True)
    r = tok(record.output, add_special_tokens=False, max_length=MAX_TARGET, padding="max_length", truncation=True)
    ids = p["input_ids"] + r["input_ids"] + [tok.pad_token_id]
    mask = p["attention_mask"] + r["attention_mask"] + [1]
    labels = [IGNORE_INDEX] * len(p["input_ids"]) + r["input_ids"] + [tok.pad_token_id]
    return ids, mask, labels


def run_reference(ws: dict, device, out_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruozhi_ui.data import load_source

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(ws["model"])
    splits = load_source(ws["data"], ws["val_fraction"], seed=42)
    train = [reference_encode(tok, r, ws["system"]) for r in splits.train]
    val = [reference_encode(tok, r, ws["system"]) for r in splits.val]
    as_tensors = lambda rows: [torch.tensor([row[k] for row in rows]) for k in range(3)]
    model = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    real_tokens = sum(sum(m) for _, m, _ in train)
    gen = torch.Generator().manual_seed(0)
    epoch_end = []
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        for start in range(0, len(order), BATCH):
            ids, mask, labels = (t.to(device) for t in as_tensors([train[i] for i in order[start:start + BATCH]]))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss.item()  # the reference logs every step to TensorBoard: one host sync per step
        epoch_end.append(time.time())
        model.eval()
        with torch.no_grad():
            for start in range(0, len(val), BATCH):
                ids, mask, labels = (t.to(device) for t in as_tensors(val[start:start + BATCH]))
                model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        model.save_pretrained(out_dir / "reference", safe_serialization=True)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    train_loss, val_loss = score(model, ws, device)
    return {"wall_s": wall, "tok_per_s": real_tokens * (EPOCHS - 1) / (epoch_end[-1] - epoch_end[0]),
            "peak_gib": peak, "train_loss": train_loss, "val_loss": val_loss}


# ---- (b) our engine -----------------------------------------------------------------------------------
def run_ours(ws: dict, device, out_dir: Path, name: str) -> dict:
    from transformers import AutoModelForCausalLM

    from ruozhi_ui.train import train

    cfg = TrainConfig(model=ModelConfig(spec=ws["model"]),
                      data=DataConfig(source=ws["data"], system_prompt=ws["system"], val_fraction=ws["val_fraction"],
                                      seed=42, max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET),
                      run_name=name, epochs=EPOCHS, batch_size=BATCH, lr=LR,
                      max_grad_norm=0.0,  # the reference's recipe does not clip
                      probe_prompts=(),  # the reference generates nothing while training
                      save_resume_state=False,  # the reference keeps no optimizer state on disk
                      log_every_steps=50, device=device.type)
    sink = ListSink()
    t0 = time.time()
    final = train(cfg, emit=sink, runs_root=out_dir)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    steps = sink.of(StepLogged)
    per_epoch = len(steps) // EPOCHS
    started = sink.events[0]
    tokens = sum(e.tok_per_s for e in steps[per_epoch:]) / max(len(steps) - per_epoch, 1)  # mean over epochs 2-3
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(device)
    train_loss, val_loss = score(model, ws, device)
    return {"wall_s": wall, "tok_per_s": tokens, "peak_gib": peak, "train_loss": train_loss, "val_loss": val_loss,
            "engine_val_loss": sink.of(EvalDone)[-1].val_loss, "precision": started.precision}


def fresh(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def use_fresh_compile_caches(root: Path) -> None:
    """Point our cache (Triton kernels, torch.compile artefacts) at an empty folder: a cold start."""
    import os

    os.environ["RUOZHI_CACHE"] = str(root / "cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "cache" / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "cache" / "triton")


def run_in_new_process(ws_file: Path, out_dir: Path, name: str) -> dict:
    import subprocess

    done = subprocess.run([sys.executable, __file__, "--child", str(ws_file), str(out_dir), name],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model, 60 records, on the CPU: checks the script")
    parser.add_argument("--child", nargs=3, metavar=("WORKSPACE", "RUNS", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    global EPOCHS
    if args.child:  # run 4: our engine in a fresh process, caches inherited through the environment
        ws = json.loads(Path(args.child[0]).read_text())
        EPOCHS = ws["epochs"]
        print(json.dumps(run_ours(ws, device, Path(args.child[1]), args.child[2])))
        return
    if args.tiny:
        EPOCHS = 2
    root = Path(tempfile.mkdtemp(prefix="train-speed-"))
    use_fresh_compile_caches(root)
    ws = build_workspace(root, TINY if args.tiny else QWEN25_05B, 60 if args.tiny else 2449,
                         12 if args.tiny else 153, device)
    ws_file = root / "workspace.json"
    ws_file.write_text(json.dumps({**ws, "epochs": EPOCHS}))
    results = {}
    for name, fn in (("ours_cold", lambda: run_ours(ws, device, root / "runs", "cold")),
                     ("reference", lambda: run_reference(ws, device, root)),
                     ("ours_warm", lambda: run_ours(ws, device, root / "runs", "warm")),
                     ("ours_warm_new_process", lambda: run_in_new_process(ws_file, root / "runs", "warm2"))):
        fresh(device)
        results[name] = fn()
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    ref = results["reference"]
    print(f"\nQwen2.5-0.5B architecture (random init), {EPOCHS} epochs + validation, batch {BATCH}, on {gpu}; "
          f"torch {torch.__version__}")
    print(f"{'run':<22} {'wall s':>7} {'tok/s':>9} {'peak GiB':>9} {'train loss':>11} {'val loss':>9} {'speedup':>8}")
    for name, r in results.items():
        print(f"{name:<22} {r['wall_s']:>7.1f} {r['tok_per_s']:>9,.0f} {r['peak_gib']:>9.2f} {r['train_loss']:>11.4f} "
              f"{r['val_loss']:>9.4f} {ref['wall_s'] / r['wall_s']:>7.2f}x")
    print("(losses: label tokens only, both models scored the same way in fp32; tok/s: real tokens, epochs 2-3)")
    ours = [results[k] for k in ("ours_cold", "ours_warm", "ours_warm_new_process")]
    summary = {"gpu": gpu, "torch": torch.__version__, **{k: v for k, v in results.items()},
               "cold_speedup": ref["wall_s"] / results["ours_cold"]["wall_s"],
               "warm_speedup": ref["wall_s"] / results["ours_warm"]["wall_s"],
               "peak_gib": max(r["peak_gib"] for r in ours)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
