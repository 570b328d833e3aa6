"""CUDA only: the captured decode step against the simple path, on random-init small Qwen2 models.

fp32: the captured path must give the simple path's greedy tokens exactly (matmuls in
full fp32, TF32 off). bf16: the two paths run different attention kernels over
different key lengths (the static cache attends over all its slots under a mask), so
rounding differs and a near-tie can flip a greedy token, after which the sequences
diverge legitimately. What bf16 must hold instead: the first token equal, and every
token the captured path chose within bf16 rounding of the best logit of a plain
full-sequence forward over the same tokens.
"""

import threading

import pytest
import torch

from ruozhi_ui.decoding import Batch, Decoder, advance_together, decode_ids
from ruozhi_ui.decoding.runners import EagerRunner, StaticRunner
from ruozhi_ui.decoding.settings import DecodeSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 4096
LENGTHS = (37, 52, 45)  # mixed prompt lengths: a left-padded batch


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


def small_qwen2(dtype: torch.dtype, seed: int = 0):
    """4 layers, 256 wide, GQA 4:2; initializer_range 0.1 (not 0.02) so greedy choices are decisive."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=1e6, initializer_range=0.1)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to("cuda", dtype).eval()


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def settings(max_new_tokens: int = 64, penalty: float = 1.1, do_sample: bool = False) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=0.7, top_p=0.8, top_k=20,
                          repetition_penalty=penalty, eos_token_ids=(), pad_token_id=0)


def run(batch: Batch) -> list[list[int]]:
    for _ in advance_together([batch]):
        pass
    return batch.tokens


def test_captured_step_gives_the_simple_paths_greedy_tokens_in_fp32():
    model, rows, s = small_qwen2(torch.float32), prompts(), settings()
    batch = Batch(Decoder(model), rows, s)
    assert isinstance(batch.runner, StaticRunner) and batch.runner.slot.graph is not None
    captured = run(batch)
    simple = decode_ids(Decoder(model, static=False), rows, s)
    one_at_a_time = [decode_ids(Decoder(model, static=False), [r], s)[0] for r in rows]
    assert captured == simple == one_at_a_time
    assert all(len(t) == 64 for t in captured)


def test_captured_bf16_tokens_are_the_argmax_of_a_plain_forward_within_rounding():
    model, rows, s = small_qwen2(torch.bfloat16), prompts(), settings(penalty=1.0)
    captured = run(Batch(Decoder(model), rows, s))
    simple = decode_ids(Decoder(model, static=False), rows, s)
    assert [t[0] for t in captured] == [t[0] for t in simple]
    for prompt, answer in zip(rows, captured):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer], device="cuda")).logits[0].float()
        steps = logits[len(prompt) - 1: len(prompt) - 1 + len(answer)]  # (answer, V): what chose each token
        chosen = steps.gather(1, torch.tensor(answer, device="cuda")[:, None])[:, 0]
        gap = steps.max(dim=1).values - chosen
        scale = steps.abs().max(dim=1).values
        assert bool((gap <= 0.02 * scale).all()), f"largest gap {float(gap.max()):.4f} at scale {float(scale.max()):.2f}"


def test_warm_up_captures_in_the_background_while_the_simple_path_answers():
    model, rows, s = small_qwen2(torch.float32), prompts()[:1], settings()
    expected = decode_ids(Decoder(model, static=False), rows, s)
    decoder = Decoder(model)
    decoder.start_warm_up()
    during = [run(Batch(decoder, rows, s, build_now=False)) for _ in range(3)]  # simple or captured, as it comes
    assert decoder.wait_warm_up(120)
    assert decoder.static_error is None and (1, 256) in decoder._slots
    batch = Batch(decoder, rows, s, build_now=False)
    assert isinstance(batch.runner, StaticRunner)
    assert during == [expected] * 3 and run(batch) == expected


def test_an_answer_begun_on_the_simple_path_finishes_on_the_captured_step_with_the_same_tokens():
    model, rows, s = small_qwen2(torch.float32), prompts()[:1], settings()
    decoder = Decoder(model)
    with decoder._lock:  # slots busy: the answer starts on the simple path, the capture waits
        batch = Batch(decoder, rows, s, build_now=False)
        decoder.start_warm_up(((1, 256),))
        ticks = advance_together([batch])
        for _ in range(5):
            next(ticks)
    assert isinstance(batch.runner, EagerRunner) and decoder.wait_warm_up(120)
    for _ in ticks:
        pass
    assert batch.switched_at == 5 and batch.runner.slot.graph is not None
    assert batch.tokens == decode_ids(Decoder(model, static=False), rows, s)


def test_both_panes_advance_in_one_loop_each_on_its_captured_step():
    models = [small_qwen2(torch.float32, seed) for seed in (0, 1)]
    decoders = [Decoder(m) for m in models]
    for d in decoders:
        d.start_warm_up(((1, 256),))
    assert all(d.wait_warm_up(120) for d in decoders)
    row, s = prompts()[:1], settings(max_new_tokens=20)
    batches = [Batch(d, row, s, build_now=False) for d in decoders]
    assert all(isinstance(b.runner, StaticRunner) for b in batches)
    assert list(advance_together(batches)) == [[[0], [0]]] * 20
    alone = [decode_ids(Decoder(m, static=False), row, s) for m in models]
    assert [b.tokens for b in batches] == alone and alone[0] != alone[1]


def test_a_busy_slot_sends_a_second_request_to_the_simple_path_with_the_same_answer():
    model, rows, s = small_qwen2(torch.float32), prompts()[:1], settings(max_new_tokens=16)
    decoder = Decoder(model)
    first = Batch(decoder, rows, s)
    second = Batch(decoder, rows, s)
    assert isinstance(first.runner, StaticRunner) and isinstance(second.runner, EagerRunner)
    for _ in advance_together([first, second]):
        pass
    assert first.tokens == second.tokens


def test_sampling_runs_on_the_captured_path():
    model, rows, s = small_qwen2(torch.bfloat16), prompts(), settings(max_new_tokens=32, do_sample=True)
    batch = Batch(Decoder(model), rows, s)
    assert isinstance(batch.runner, StaticRunner)
    tokens = run(batch)
    assert [len(t) for t in tokens] == [32, 32, 32] and all(0 <= t < VOCAB for row in tokens for t in row)


def test_cancel_from_another_thread_stops_a_captured_batch():
    model, rows, s = small_qwen2(torch.float32), prompts(), settings(max_new_tokens=500)
    cancel, batch = threading.Event(), Batch(Decoder(model), rows, s)
    for tick, _ in enumerate(advance_together([batch], cancel), start=1):
        if tick == 5:
            threading.Thread(target=cancel.set).start()
    assert batch.done and 5 <= len(batch.tokens[0]) < 500
