"""UI handlers as plain functions: config building, status rendering, data paging/search, inspector, estimate."""

import dataclasses
import math
from pathlib import Path

import gradio as gr
import pytest

from ruozhi_ui.config import DEFAULT_DATASET, DEFAULT_MODEL, TrainConfig
from ruozhi_ui.encoding import IGNORE_INDEX, encode_record
from ruozhi_ui.errors import ConfigError, DataFormatError
from ruozhi_ui.events import CheckpointSaved, EvalDone, RunStarted, SampleGenerated, StepLogged
from ruozhi_ui.jobs import JobRunner, JobSnapshot
from ruozhi_ui.policy import Policy
from ruozhi_ui.ui import data_tab, shell, train_tab
from ruozhi_ui.ui.context import AppContext


SYSTEM = "你是一个有帮助的助手"


def local_ctx(root, runner=None) -> AppContext:
    """The services a local-mode app hands its handlers (no components: handlers take plain values)."""
    return AppContext(policy=Policy(mode="local", runs_root=root), runner=runner or JobRunner(root))


def _step(i, loss=2.0, num_steps=8):
    return StepLogged(step=i, epoch=i / 4, loss=loss, lr=1e-4, tok_per_s=1234.0, elapsed_s=10.0 * i, eta_s=65.0,
                      mem_gib=0.5, num_steps=num_steps)


STARTED = RunStarted(run_dir="/runs/r", num_steps=8, steps_per_epoch=4, num_train=40, num_val=4, params_trained=10,
                     params_total=10, device="cpu", precision="fp32")


# --- Train tab -----------------------------------------------------------------------------
def test_build_train_config_defaults_equal_train_config():
    cfg = train_tab.build_train_config(DEFAULT_MODEL, False, DEFAULT_DATASET, **train_tab.form_defaults())
    assert cfg == TrainConfig()


def test_build_train_config_takes_widget_values():
    form = {**train_tab.form_defaults(), "method": "lora", "lora_rank": 4.0, "epochs": 2.0, "max_source_length": 80.0,
            "lr": 2e-4, "packing": True}
    cfg = train_tab.build_train_config("demo", True, "sample", **form)
    assert (cfg.method, cfg.lora_rank, cfg.epochs, cfg.data.max_source_length, cfg.lr, cfg.packing) == \
        ("lora", 4, 2, 80, 2e-4, True)
    assert (cfg.model.spec, cfg.model.trust_remote_code, cfg.data.source) == ("demo", True, "sample")
    assert type(cfg.epochs) is int


def test_build_train_config_rejects_fractional_epochs():
    with pytest.raises(ConfigError, match="epochs must be a whole number"):
        train_tab.build_train_config("demo", False, "sample", epochs=1.5)


def test_build_train_config_rejects_an_empty_number():
    with pytest.raises(ConfigError, match="batch_size is empty"):
        train_tab.build_train_config("demo", False, "sample", batch_size=None)


def test_render_status_idle_shows_no_run():
    fig, progress, probes, ckpts, error = train_tab.render_status(JobSnapshot(version=0, status="idle"), "en")
    assert fig.layout.annotations[0].text == "No training run yet"
    assert 'data-status="idle"' in progress and "Idle" in progress
    assert ckpts == "No checkpoints saved yet." and error == ""


def test_render_status_running_shows_steps_progress_probes_and_checkpoints():
    snap = JobSnapshot(version=5, status="running", config={"epochs": 2}, run_dir="/runs/r", started=STARTED,
                       steps=(_step(1, 3.0), _step(2, 2.5)), evals=(EvalDone(step=2, epoch=1, val_loss=2.4, val_ppl=11.0),),
                       samples=(SampleGenerated(step=2, epoch=1, answers=(("问题", "回答"),)),),
                       checkpoints=(CheckpointSaved(step=2, epoch=1, path="/runs/r/checkpoints/epoch-1", final=False),),
                       started_at=100.0)
    fig, progress, probes, ckpts, error = train_tab.render_status(snap, "en", now=130.0)
    assert list(fig.data[0].y) == [3.0, 2.5] and list(fig.data[2].y) == [2.4]
    assert 'data-step="2" data-num-steps="8"' in progress and "width:25.0%" in progress
    assert "step 2/8" in progress and "elapsed 0:00:30" in progress and "ETA 0:01:05" in progress
    assert "<th scope='row'>问题</th>" in probes and "回答" in probes
    assert "`/runs/r/checkpoints/epoch-1`" in ckpts and error == ""


def test_render_status_failed_shows_error_and_hint():
    snap = JobSnapshot(version=3, status="failed", error="OutOfMemoryError: CUDA", hint="lower the batch size",
                       started_at=1.0, finished_at=2.0)
    *_, error = train_tab.render_status(snap, "en")
    assert error == "**Training failed:** OutOfMemoryError: CUDA\n\n**Hint:** lower the batch size"


def test_tick_skips_when_the_version_is_unchanged(tmp_path):
    ctx = local_ctx(tmp_path)
    *outputs, timer = train_tab.on_tick(ctx, 0, "en")
    assert all(isinstance(x, type(gr.skip())) for x in outputs)
    assert train_tab.on_tick(ctx, -1, "en")[0] == 0


def test_the_timer_runs_only_while_a_job_does(tmp_path):
    ctx = local_ctx(tmp_path)
    assert train_tab.on_tick(ctx, -1, "en")[-1].active is False
    assert train_tab.on_refresh(ctx, "en")[-1].active is False


def test_a_reloaded_page_gets_the_running_jobs_settings_back_and_idle_keeps_the_form():
    from ruozhi_ui.config import config_to_dict

    cfg = train_tab.build_train_config("demo", False, "sample", epochs=2, lr=3e-4, max_target_length=99,
                                       run_name="mine", method="lora")

    class Runner:
        def __init__(self, snap):
            self.snap = snap

        def snapshot(self):
            return self.snap

    running = JobSnapshot(version=4, status="running", config=config_to_dict(cfg))
    model, trust, source, *form = train_tab.on_page_load_form(local_ctx(Path("runs"), Runner(running)))
    assert (model, trust, source) == ("demo", False, "sample")
    assert train_tab.build_train_config(model, trust, source, **dict(zip(train_tab.FORM_FIELDS, form))) == cfg
    idle = train_tab.on_page_load_form(local_ctx(Path("runs"), Runner(JobSnapshot(version=0, status="idle"))))
    assert len(idle) == 3 + len(train_tab.FORM_FIELDS) and all(isinstance(v, type(gr.skip())) for v in idle)


def test_poll_status_of_an_idle_runner(tmp_path):
    s = train_tab.poll_status(local_ctx(tmp_path))
    assert (s["status"], s["step"], s["num_steps"], s["checkpoints"], s["error"]) == ("idle", 0, 0, [], "")


def test_start_conflict_becomes_gr_error(tmp_path):
    import threading

    release = threading.Event()
    ctx = local_ctx(tmp_path, JobRunner(tmp_path, train_fn=lambda cfg, emit, stop, root: release.wait(10)))
    form = train_tab.form_defaults()
    train_tab.on_start(ctx, "demo", False, "sample", "en", **form)
    try:
        with pytest.raises(gr.Error, match="already in progress"):
            train_tab.on_start(ctx, "demo", False, "sample", "en", **form)
        assert train_tab.on_stop(ctx, "en").startswith("Stop requested")
    finally:
        release.set()
        ctx.runner.wait(10)


def test_num_steps_is_epochs_times_batches_per_epoch():
    from ruozhi_ui.preflight import num_steps

    assert num_steps(150, 3, 12) == 3 * math.ceil(150 / 12) == 39
    assert num_steps(150, 3, 12, max_steps=5) == 5


def test_lora_params_count_rank_times_in_plus_out_on_targets():
    from ruozhi_ui.preflight import ModelShape, lora_params

    shape = ModelShape(params_total=0, hidden_size=4, num_layers=1,
                       lora_in_out=(("q_proj", 4, 4), ("down_proj", 8, 4), ("lm_head", 4, 100)))
    assert lora_params(shape, 2, ("q_proj", "down_proj")) == 2 * (4 + 4) + 2 * (8 + 4)


def test_estimate_counts_all_demo_parameters_for_full_training(demo_dir, demo_model):
    from ruozhi_ui.preflight import estimate

    cfg = dataclasses.replace(TrainConfig(), model=dataclasses.replace(TrainConfig().model, spec="demo"))
    est = estimate(cfg, 24)
    assert est.params_trained == est.params_total == sum(p.numel() for p in demo_model.parameters())
    assert est.num_steps == 3 * 2


# --- Data tab ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_ctx(tmp_path_factory):
    return local_ctx(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def loaded(data_ctx):
    return data_tab.load_data(data_ctx, data_tab.DataKey("sample", "demo", False, ""))


def test_load_data_is_cached_per_source_and_model(loaded, data_ctx):
    assert data_tab.load_data(data_ctx, data_tab.DataKey("sample", "demo", False, "")) is loaded
    assert len(loaded.rows) == len(loaded.splits.train) + len(loaded.splits.val)


def test_preview_pages_through_rows(loaded):
    table, page, n_pages, n = data_tab.preview_page(loaded.rows, "", 2, 10)
    assert [row[0] for row in table] == list(range(10, 20))
    assert (page, n_pages, n) == (2, math.ceil(len(loaded.rows) / 10), len(loaded.rows))


def test_preview_clamps_the_page_number(loaded):
    _, page, n_pages, _ = data_tab.preview_page(loaded.rows, "", 10_000, 10)
    assert page == n_pages


def test_search_filters_instruction_and_output(loaded):
    word = loaded.rows[3][1].instruction[:4]
    table, _, _, n = data_tab.preview_page(loaded.rows, word, 1, 100)
    assert 3 in [row[0] for row in table]
    assert n == sum(1 for _, r in loaded.rows if word.lower() in r.instruction.lower() or word.lower() in r.output.lower())


def test_failed_load_raises_gr_error_and_keeps_the_cache(loaded, data_ctx):
    with pytest.raises(gr.Error, match="Loading failed"):
        data_tab.on_load(data_ctx, "/no/such/file.json", "demo", False, 10, "en")
    assert data_tab.load_data(data_ctx, loaded.key) is loaded


def test_inspector_highlights_exactly_the_label_tokens(loaded, tokenizer):
    text, segments, summary = data_tab.inspect_record(loaded, 0, 62, 151, "en")
    ex = encode_record(tokenizer, loaded.rows[0][1], "你是一个有帮助的助手", 62, 151)
    trained = [s for s, cat in segments if cat is not None]
    assert "".join(trained) == tokenizer.decode([x for x in ex.labels if x != IGNORE_INDEX])
    assert "".join(s for s, cat in segments if cat is None) == tokenizer.decode(ex.input_ids[:ex.prompt_len])
    assert text == tokenizer.decode(ex.input_ids)
    assert f"{sum(1 for x in ex.labels if x != IGNORE_INDEX)} answer" in summary


def test_inspector_rejects_an_out_of_range_row(loaded):
    with pytest.raises(DataFormatError, match="Row index out of range"):
        data_tab.inspect_record(loaded, len(loaded.rows), 62, 151, "en")


def test_stats_handler_gives_table_figure_and_suggestions(loaded, data_ctx):
    table, fig, truncation, src, tgt = data_tab.on_stats(data_ctx, loaded.key, "train", SYSTEM, 62, 151, "en")
    stats = data_tab.data_stats(data_ctx, loaded, 62, 151, "train", SYSTEM)
    assert [row[0] for row in table["data"]] == ["Instruction", "Output", "Templated prompt", "Total"]
    assert len(fig.data) == 4 and "max_source_length 62" in truncation
    assert (src, tgt) == (stats.suggested_max_source_length, stats.suggested_max_target_length)


def test_statistics_cover_the_whole_file_by_default_and_use_the_forms_system_prompt(loaded, data_ctx):
    from ruozhi_ui.stats import compute_stats

    whole = data_tab.data_stats(data_ctx, loaded, 62, 151)
    assert whole.n == len(loaded.splits.train) + len(loaded.splits.val)
    short = data_tab.data_stats(data_ctx, loaded, 62, 151, "all", "短")
    assert short.prompt.mean < whole.prompt.mean  # the form's (shorter) system prompt is what is measured
    assert short == compute_stats(loaded.splits.train + loaded.splits.val, loaded.tokenizer, "短", 62, 151)


def test_use_suggested_lengths_copies_both_values():
    assert data_tab.copy_suggested(57.0, 117.0) == (57, 117)


def test_use_suggested_lengths_without_stats_changes_nothing():
    assert all(isinstance(x, type(gr.skip())) for x in data_tab.copy_suggested(None, None))


def test_source_kind_sets_the_source_textbox():
    assert data_tab.source_for_kind("sample", DEFAULT_DATASET) == ("sample", False)
    assert data_tab.source_for_kind("hub", "sample") == (DEFAULT_DATASET, False)
    assert data_tab.source_for_kind("upload", "sample") == ("sample", True)


# --- shell ---------------------------------------------------------------------------------
def test_offline_notice_only_when_the_hub_is_involved():
    assert shell.needs_hub(DEFAULT_MODEL, "sample") and shell.needs_hub("demo", DEFAULT_DATASET)
    assert not shell.needs_hub("demo", "sample")
    assert shell.offline_notice("demo", "sample", "en")[1] == ""


def test_start_fetches_a_hub_model_first_and_reports_offline_clearly(monkeypatch):
    import huggingface_hub

    from ruozhi_ui.ui.train_tab import on_fetch_model

    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs["allow_patterns"]))
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(gr.Error, match="demo"):
        on_fetch_model(local_ctx(Path("runs")), "Qwen/Qwen2.5-0.5B-Instruct", "en")
    assert calls[0][0] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "*.safetensors" in calls[0][1] and not any("bin" in p for p in calls[0][1])


def test_start_needs_no_download_for_the_demo_model(monkeypatch, demo_dir):
    import huggingface_hub

    from ruozhi_ui.ui.train_tab import on_fetch_model

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    on_fetch_model(local_ctx(Path("runs")), "demo", "en")


# --- nothing a user or a model writes is rendered as Markdown or HTML -------------------------
IMAGE = "![x](http://example.invalid/x.png) <img src=http://example.invalid/y>"


def test_probe_answers_and_prompts_show_tags_as_text():
    snap = JobSnapshot(version=1, status="running", samples=(SampleGenerated(step=1, epoch=1, answers=((IMAGE, IMAGE),)),))
    text = train_tab.probes_html(snap, "en")
    assert "<img" not in text and "&lt;img src=http://example.invalid/y&gt;" in text


def test_probes_are_one_prompt_by_epoch_table_with_answers_that_expand():
    samples = tuple(SampleGenerated(step=s, epoch=e, answers=(("问一", f"答{e}" * 30), ("问二", "")))
                    for e, s in ((1, 4), (2, 8)))
    text = train_tab.probes_html(JobSnapshot(version=1, status="running", samples=samples), "en")
    assert text.count("<tr>") == 3 and text.count("<details>") == 2  # header + 2 prompts; empty answers do not open
    assert "Epoch 2 (step 8)" in text and "∅ (empty answer)" in text
    assert f"<summary>{'答1' * 20}…</summary>" in text  # the first 40 characters, then the whole answer on click


def test_a_failed_runs_error_is_escaped():
    snap = JobSnapshot(version=1, status="failed", error=f"DataFormatError: {IMAGE}")
    text = train_tab.error_markdown(snap, "en")
    assert "![x](" not in text and "<img" not in text


def test_the_offline_notice_quotes_the_source_as_code():
    _, text = shell.offline_notice(DEFAULT_MODEL, "owner/x` ![y](http://example.invalid/z)", "en")
    assert "`owner/x' ![y](http://example.invalid/z)`" in text


def test_errors_follow_the_page_language_whole(data_ctx):
    with pytest.raises(gr.Error) as zh:
        data_tab.on_load(data_ctx, "/no/such/file.json", "demo", False, 10, "zh")
    with pytest.raises(gr.Error) as en:
        data_tab.on_load(data_ctx, "/no/such/file.json", "demo", False, 10, "en")
    assert zh.value.message == "加载失败：/no/such/file.json：文件不存在"
    assert en.value.message == "Loading failed: /no/such/file.json: no such file"


def test_a_failed_action_leaves_its_error_for_the_line_beside_it(data_ctx):
    from types import SimpleNamespace

    from ruozhi_ui.ui.boundary import show_last_error

    request = SimpleNamespace(session_hash="s1")
    with pytest.raises(gr.Error):
        data_tab.on_load(data_ctx, "/no/such/file.json", "demo", False, 10, "en", request=request)
    assert show_last_error(data_ctx, request) == "<span class='rz-error'>⚠️ Loading failed: /no/such/file\\.json: no such file</span>"
    assert show_last_error(data_ctx, request) == ""  # shown once
