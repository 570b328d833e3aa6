"""Compare tab handlers as plain functions, plus one layout build."""

import os
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
import torch

from ruozhi_ui import generation as g
from ruozhi_ui.config import DataConfig, GenConfig, ModelConfig, TrainConfig, save_config
from ruozhi_ui.ui import compare_tab as ct

PROMPT = "游泳比赛时把水喝光后跑步犯规吗"
TUNED_SYSTEM = "你是弱智吧吧友"
# respond's widget values: system prompt, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty
GREEDY = dict(max_new_tokens=12, do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0)


def make_checkpoint(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample", system_prompt=TUNED_SYSTEM))
    save_config(cfg, folder / "run_config.json")
    return folder


@pytest.fixture
def runs(tmp_path, demo_model, tokenizer):
    """A runs root with two checkpoints of one run; epoch-2 is the newer."""
    root = tmp_path / "runs"
    old = make_checkpoint(demo_model, tokenizer, root / "r1" / "checkpoints" / "epoch-1")
    with torch.no_grad():
        torch.manual_seed(1)
        demo_model.model.norm.weight.mul_(torch.randn_like(demo_model.model.norm.weight) * 4)
    new = make_checkpoint(demo_model, tokenizer, root / "r1" / "checkpoints" / "epoch-2")
    os.utime(old, (time.time() - 100, time.time() - 100))
    return root, old, new


def run_respond(checkpoint, base_history, tuned_history, lang="en", **overrides):
    widgets = {**GREEDY, **overrides}
    return ct.respond(base_history, tuned_history, "demo", str(checkpoint), False, "你是一个有帮助的助手",
                      widgets["max_new_tokens"], widgets["do_sample"], widgets["temperature"], widgets["top_p"],
                      widgets["top_k"], widgets["repetition_penalty"], lang, None)


def test_history_pairs_flattens_gradio6_content_blocks():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好！"}]},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2", "metadata": None},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/x.png"}}, {"type": "text", "text": "看图"}]},
    ]
    assert ct.history_pairs(history) == [("你好", "你好！"), ("1+1", "2")]


def test_pending_message_is_the_unanswered_last_user_turn():
    assert ct.pending_message([{"role": "user", "content": [{"type": "text", "text": "问"}]}]) == "问"
    assert ct.pending_message([{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]) is None
    assert ct.pending_message([]) is None


def test_append_user_adds_the_turn_to_both_panes_and_clears_the_box():
    box, base, tuned = ct.append_user("问", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], [], "en")
    assert box == ""
    assert base[-1] == {"role": "user", "content": "问"} and len(base) == 3
    assert tuned == [{"role": "user", "content": "问"}]


def test_append_user_refuses_an_empty_message():
    with pytest.raises(gr.Error):
        ct.append_user("  ", [], [], "en")


def test_refresh_preselects_the_newest_checkpoint_and_keeps_a_valid_choice(runs):
    root, old, new = runs
    assert ct.checkpoint_choices(root) == [("r1/checkpoints/epoch-2", str(new)), ("r1/checkpoints/epoch-1", str(old))]
    assert ct.refresh_checkpoints(str(root), None).value == str(new)
    assert ct.refresh_checkpoints(str(root), str(old)).value == str(old)
    assert ct.refresh_checkpoints(str(root), "/gone").value == str(new)


def test_picking_a_checkpoint_sets_its_training_system_prompt_and_title(runs):
    _, _, new = runs
    prompt, title = ct.on_checkpoint_change(str(new), "old prompt", "en")
    assert prompt == TUNED_SYSTEM
    assert title == f"**Fine-tuned model**　`tuned: {new} (full, from demo)`"
    assert ct.on_checkpoint_change(None, "old prompt", "en") == ("old prompt", ct.t("compare.tuned_none", "en"))


def test_respond_streams_both_panes_titled_with_the_weights_used(runs):
    _, _, new = runs
    user = [{"role": "user", "content": PROMPT}]
    outputs = list(run_respond(new, user, user))
    base_hist, tuned_hist, base_title, tuned_title = outputs[-1]
    assert base_title == "**Base model**　`base: demo (tiny offline model, random weights)`"
    assert tuned_title == f"**Fine-tuned model**　`tuned: {new} (full, from demo)`"
    base, tuned = g.get_model("demo"), g.get_model(str(new))
    gen = GenConfig(max_new_tokens=12)
    assert base_hist == [*user, {"role": "assistant", "content": g.generate_answer(base, PROMPT, "你是一个有帮助的助手", gen)[0]}]
    assert tuned_hist[-1]["content"] == g.generate_answer(tuned, PROMPT, "你是一个有帮助的助手", gen)[0]
    texts = [o[0][-1]["content"] for o in outputs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_respond_uses_each_panes_own_history(runs):
    _, _, new = runs
    base_user = [{"role": "user", "content": "甲"}, {"role": "assistant", "content": "乙"}, {"role": "user", "content": PROMPT}]
    tuned_user = [{"role": "user", "content": PROMPT}]
    base_hist, tuned_hist, *_ = list(run_respond(new, base_user, tuned_user))[-1]
    base = g.get_model("demo")
    expected = g.generate_answer(base, PROMPT, "你是一个有帮助的助手", GenConfig(max_new_tokens=12), history=[("甲", "乙")])[0]
    assert base_hist[-1]["content"] == expected
    assert len(tuned_hist) == 2


def test_respond_without_a_pending_user_turn_yields_nothing(runs):
    _, _, new = runs
    assert list(run_respond(new, [], [])) == []


def test_respond_without_a_checkpoint_is_a_gr_error():
    with pytest.raises(gr.Error):
        list(run_respond("", [{"role": "user", "content": PROMPT}], [{"role": "user", "content": PROMPT}]))


def test_stop_generation_ends_the_session_streams_early(runs):
    _, _, new = runs
    user = [{"role": "user", "content": PROMPT}]
    full = list(run_respond(new, user, user, max_new_tokens=200))[-1][0][-1]["content"]
    stream = run_respond(new, user, user, max_new_tokens=200)
    next(stream)  # titles, empty answers
    next(stream)  # first delta
    ct.stop_generation(None)
    last = list(stream)
    answer = last[-1][0][-1]["content"] if last else ""
    assert len(answer) < len(full)
    assert ct._active.get("local", set()) == set()


def test_run_ab_on_pasted_prompts_writes_a_csv_under_the_runs_root(runs):
    root, _, new = runs
    outputs = list(ct.run_ab("demo", str(new), False, "你是一个有帮助的助手", "sample", "pasted", 50,
                             "地球上有70亿人\n\n一些高中想提高升学率\n", 6, 1.0, str(root), "en"))
    loss_md, table, csv = outputs[-1]
    assert loss_md == ct.t("compare.ab_no_loss", "en")
    assert list(table["prompt"]) == ["地球上有70亿人", "一些高中想提高升学率"]
    assert Path(csv).parent == root / "_compare" and Path(csv).name.startswith("ab-")
    assert list(pd.read_csv(csv, encoding="utf-8-sig")["prompt"]) == ["地球上有70亿人", "一些高中想提高升学率"]


def test_run_ab_on_the_validation_set_shows_both_losses(runs):
    root, _, new = runs
    outputs = list(ct.run_ab("demo", str(new), False, TUNED_SYSTEM, "sample", "validation", 2, "", 4, 1.0,
                             str(root), "en"))
    loss_md, table, csv = outputs[-1]
    assert loss_md.startswith("Validation loss (2 records, the training objective): base **")
    assert len(table) == 2 and table["reference"].str.len().min() > 0
    assert csv is not None


def test_build_gives_every_component_its_elem_id(tmp_path):
    from ruozhi_ui.jobs import JobRunner
    from ruozhi_ui.ui.context import AppContext

    with gr.Blocks() as demo:
        ctx = AppContext(runner=JobRunner(tmp_path), runs_root=tmp_path, model_spec=gr.Dropdown(["demo"], value="demo"),
                         trust_remote_code=gr.Checkbox(False), data_source=gr.Textbox("sample"),
                         lang=gr.Radio(["zh", "en"], value="zh"))
        with gr.Tabs():
            with gr.Tab("compare"):
                handles = ct.build(ctx)
    ids = {b.elem_id for b in demo.blocks.values()}
    assert {"compare-checkpoint", "compare-refresh", "compare-input", "compare-send", "compare-stop", "compare-clear",
            "compare-base-label", "compare-tuned-label", "compare-base-chat", "compare-tuned-chat", "compare-ab-run",
            "compare-ab-table", "compare-ab-csv"} <= ids
    assert handles.max_new_tokens.value == GenConfig().max_new_tokens


def test_fetch_base_model_is_a_no_op_for_the_demo_and_a_gr_error_offline(demo_dir):
    assert isinstance(ct.fetch_base_model("demo", "runs/r/checkpoints/final", "en"), type(gr.skip()))
    with pytest.raises(gr.Error):
        ct.fetch_base_model("no-such-owner/no-such-model-xyz", "runs/r/checkpoints/final", "en")  # offline in tests
    with pytest.raises(gr.Error, match="checkpoint"):
        ct.fetch_base_model("no-such-owner/no-such-model-xyz", None, "en")  # no download before that error
