"""GGUF export, checked by llama.cpp itself: a trained demo checkpoint's GGUF loads in a real llama.cpp
(node-llama-cpp's prebuilt CPU build, installed by .ci/run from the npm registry into tests/llama_cpp),
tokenizes chat prompts as transformers does, and decodes the same greedy tokens (F16: all of them; Q8_0:
most positions, the measured share printed). Without node or the package the module is skipped locally
and fails in CI, so CI never passes by not looking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ruozhi_ui.config import REFERENCE_PROMPTS, DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.export import ExportRequest, run_export
from ruozhi_ui.export.gguf_file import MODELFILE, pre_tokenizer_type
from ruozhi_ui.models import load_model, load_tokenizer
from ruozhi_ui.train import loop

HERE = Path(__file__).parent / "llama_cpp"
NEW_TOKENS = 32
Q8_AGREEMENT = 0.9  # of greedy positions; measured 1.0 (128 of 128) on the demo checkpoint
F16_PROB_GAP = 1e-4  # measured 9.1e-06 on the demo checkpoint
Q8_PROB_GAP = 5e-3  # measured 1.6e-04
EXTRA_PROMPT = "Hello world 123, 你好！\n第二行：digits 4567 and 'quotes'"


def llama_cpp_missing() -> str:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (HERE / "node_modules" / "node-llama-cpp").is_dir():
        return "node-llama-cpp is not installed (npm install --prefix tests/llama_cpp)"
    return ""


if llama_cpp_missing():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must test GGUF with a real llama.cpp: {llama_cpp_missing()}")
    pytest.skip(llama_cpp_missing(), allow_module_level=True)


def llama_cpp_greedy(gguf: Path, prompts: list[dict], n: int) -> list[dict]:
    job = json.dumps({"model": str(gguf), "prompts": prompts, "n": n})
    done = subprocess.run(["node", str(HERE / "greedy.mjs")], input=job, capture_output=True, text=True, cwd=HERE,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("gguf-runs")
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3, epochs=2,
                      max_steps=24, probe_max_new_tokens=4, device="cpu", run_name="gguf")
    return Path(loop.train(cfg, emit=lambda e: None, stop_event=None, runs_root=root))


@pytest.fixture(scope="module")
def cases(trained):
    """The chat prompts (templated as training renders them) and transformers' greedy continuations."""
    tokenizer = load_tokenizer(str(trained))
    model = load_model(str(trained), torch.device("cpu"), torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": DataConfig().system_prompt},
                                            {"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in REFERENCE_PROMPTS]
    texts.append(EXTRA_PROMPT)
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
            probs = model(torch.tensor([ids])).logits[0].softmax(-1)
        out.append({"text": text, "ids": ids, "expected": new[0, len(ids):].tolist(), "probs": probs.tolist(),
                    "argmax": probs.argmax(-1).tolist()})
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = {}
    for quant in ("f16", "q8_0"):
        folder = tmp_path_factory.mktemp(f"gguf-{quant}")
        out[quant] = Path(run_export(ExportRequest(checkpoint=trained, format="gguf", output=folder,
                                                   quant=quant)).files[0])
    return out


@pytest.fixture(scope="module")
def answers(exported, cases):
    prompts = [{"text": c["text"], "ids": c["ids"]} for c in cases]
    return {quant: llama_cpp_greedy(path, prompts, NEW_TOKENS) for quant, path in exported.items()}


def test_demo_tokenizer_is_written_with_the_qwen2_pre_tokenizer(trained):
    assert pre_tokenizer_type(load_tokenizer(str(trained))) == "qwen2"


def test_llama_cpp_tokenizes_chat_prompts_as_transformers_does(answers, cases):
    for quant in ("f16", "q8_0"):
        assert [a["tokenized"] for a in answers[quant]] == [c["ids"] for c in cases]


def test_llama_cpp_f16_greedy_tokens_equal_transformers(answers, cases):
    assert [a["generated"] for a in answers["f16"]] == [c["expected"] for c in cases]


def test_llama_cpp_q8_0_greedy_tokens_agree_on_most_positions(answers, cases):
    pairs = [(g, e) for a, c in zip(answers["q8_0"], cases) for g, e in zip(a["generated"], c["expected"])]
    agreement = sum(g == e for g, e in pairs) / len(pairs)
    print(f"Q8_0 greedy agreement with transformers: {agreement:.3f} of {len(pairs)} positions")
    assert len(pairs) == NEW_TOKENS * len(cases) and agreement >= Q8_AGREEMENT


def distribution_gap(answers, cases) -> float:
    """The largest |p_llama.cpp - p_transformers| over llama.cpp's top next tokens at every prompt position."""
    return max(abs(p - c["probs"][i][token]) for a, c in zip(answers, cases)
               for i, top in enumerate(a["top"]) for token, p in top)


def test_llama_cpp_f16_next_token_distribution_matches_transformers_at_every_prompt_position(answers, cases):
    """A briefly trained demo model answers with one repeated token; its next-token distributions after
    each prefix of the prompts differ from position to position, so they are compared too."""
    gap = distribution_gap(answers["f16"], cases)
    print(f"F16: largest next-token probability gap over {sum(len(c['ids']) for c in cases)} positions: {gap:.2e}")
    assert gap < F16_PROB_GAP
    assert [[top[0][0] for top in a["top"]] for a in answers["f16"]] == [c["argmax"] for c in cases]


def test_llama_cpp_q8_0_next_token_distribution_is_close_to_transformers(answers, cases):
    gap = distribution_gap(answers["q8_0"], cases)
    print(f"Q8_0: largest next-token probability gap: {gap:.2e}")
    assert gap < Q8_PROB_GAP


def test_prompt_positions_have_varied_next_token_distributions(cases):
    """The comparison means something only if what the model predicts changes along the prompt."""
    top_probabilities = [max(p) for c in cases for p in c["probs"]]
    assert max(top_probabilities) - min(top_probabilities) > 10 * F16_PROB_GAP


def test_gguf_folder_holds_an_ollama_modelfile_naming_the_file(exported):
    text = (exported["f16"].parent / MODELFILE).read_text(encoding="utf-8")
    assert text.splitlines()[0] == "FROM ./model-f16.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and f'SYSTEM """{DataConfig().system_prompt}"""' in text
