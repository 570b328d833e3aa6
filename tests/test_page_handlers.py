"""Issue 24 as plain functions: the form's bounds beside Start, the truncation warning, the ETA and tok/s, the
offline box, error causes in a details fold, and the install's platform markers."""

import dataclasses
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

from ruozhi_ui.config import DEFAULT_DATASET, DEFAULT_MODEL, TrainConfig, validate
from ruozhi_ui.errors import ConfigError, DataFormatError
from ruozhi_ui.events import StepLogged
from ruozhi_ui.i18n import t
from ruozhi_ui.jobs import JobRunner, JobSnapshot
from ruozhi_ui.policy import Policy
from ruozhi_ui.train.run import Run
from ruozhi_ui.ui import shell, train_tab
from ruozhi_ui.ui.boundary import details_html, md_text, split_cause
from ruozhi_ui.ui.context import AppContext
from ruozhi_ui.ui.train_form import BOUNDS, build_train_config, form_defaults, truncation_warning
from ruozhi_ui.ui.train_view import eta_s, progress_html

ROOT = Path(__file__).resolve().parent.parent


def _form(**changes):
    return {**form_defaults(), **changes}


def _step(i, eta=100.0):
    return StepLogged(step=i, epoch=i / 4, loss=2.0, lr=1e-4, tok_per_s=10.0, elapsed_s=float(i), eta_s=eta,
                      mem_gib=0.5, num_steps=8)


# --- the form's checks, beside Start ----------------------------------------------------------
def test_epochs_0_names_the_field_and_its_bound_in_chinese():
    with pytest.raises(ConfigError) as caught:
        build_train_config(DEFAULT_MODEL, False, DEFAULT_DATASET, **_form(epochs=0))
    assert caught.value.localized("zh") == "训练轮数 epochs 至少为 1（现在是 0）"


def test_epochs_0_names_the_field_and_its_bound_in_english():
    with pytest.raises(ConfigError) as caught:
        build_train_config(DEFAULT_MODEL, False, DEFAULT_DATASET, **_form(epochs=0))
    assert caught.value.localized("en") == "Epochs must be at least 1 (got 0)"


# grad_accum_steps 0 makes validate() itself divide by zero (config.py evaluates every check at once); the
# form's own check refuses it first (test below).
@pytest.mark.parametrize("name", sorted(set(BOUNDS) - {"grad_accum_steps"}))
def test_each_form_bound_is_the_one_validate_holds(name):
    low, high, low_in, high_in = BOUNDS[name]
    def config(value):
        cfg = TrainConfig(**{name: value}) if name not in ("max_source_length", "max_target_length") else \
            dataclasses.replace(TrainConfig(), data=dataclasses.replace(TrainConfig().data, **{name: value}))
        return cfg
    inside = low if low_in else (low + (high if high is not None else low + 1)) / 2
    outside = low - 1 if low_in else low
    validate(config(inside))
    with pytest.raises(ConfigError):
        validate(config(outside))


def test_grad_accum_steps_0_is_refused_by_the_form_before_validate():
    with pytest.raises(ConfigError) as caught:
        build_train_config(DEFAULT_MODEL, False, DEFAULT_DATASET, **_form(grad_accum_steps=0))
    assert caught.value.localized("en") == "Gradient accumulation steps must be at least 1 (got 0)"


def test_lr_1_is_refused_with_both_bounds():
    with pytest.raises(ConfigError) as caught:
        build_train_config(DEFAULT_MODEL, False, DEFAULT_DATASET, **_form(lr=1.0))
    assert caught.value.localized("en") == "Learning rate must be above 0 and below 1 (got 1.0)"


def test_a_batch_that_is_no_multiple_of_the_accumulation_is_refused_in_the_pages_language():
    with pytest.raises(ConfigError) as caught:
        build_train_config(DEFAULT_MODEL, False, DEFAULT_DATASET, **_form(batch_size=12, grad_accum_steps=5))
    assert caught.value.localized("zh") == "批大小（12）必须是梯度累积步数（5）的整数倍"


def _ctx(tmp_path):
    return AppContext(policy=Policy(mode="local", runs_root=tmp_path), runner=JobRunner(tmp_path))


def test_a_form_out_of_bounds_disables_start_and_says_why(tmp_path):
    estimate, check, start = train_tab.on_form_change(_ctx(tmp_path), "demo", False, "sample", 0, None, "en",
                                                      **_form(max_source_length=1))
    assert (estimate, start["interactive"]) == ("", False)
    assert check == ("<span class='rz-error'>⚠️ " + md_text(t("err.form.min", "en", low=8, value=1,
                     name=t("train.max_source_length", "en"))) + "</span>")


def test_a_valid_form_enables_start_with_an_estimate_and_no_line(tmp_path, demo_dir):
    estimate, check, start = train_tab.on_form_change(_ctx(tmp_path), "demo", False, "sample", 24, None, "en",
                                                      **_form(epochs=1))
    assert (check, start["interactive"]) == ("", True)
    assert "**Steps** 2" in estimate  # 1 epoch x ceil(24 / 12)


def test_no_truncation_warning_while_most_answers_fit():
    assert truncation_warning(SimpleNamespace(output_truncated_share=0.5, max_target_length=151,
                                              output=SimpleNamespace(p95=150.0)), "en") == ""


def test_a_max_target_length_that_cuts_most_answers_is_warned_of():
    stats = SimpleNamespace(output_truncated_share=0.97, max_target_length=8, output=SimpleNamespace(p95=151.6))
    assert truncation_warning(stats, "en").startswith("max_target_length 8 cuts 97% of the loaded data's answers "
                                                      "(their p95 is 152 tokens)")


# --- the run in sight ---------------------------------------------------------------------------
def test_the_eta_counts_down_between_step_events():
    snap = JobSnapshot(version=1, status="running", steps=(_step(3, eta=100.0),), last_step_at=1000.0)
    assert eta_s(snap, now=1030.0) == 70.0


def test_the_eta_stops_at_zero():
    snap = JobSnapshot(version=1, status="running", steps=(_step(3, eta=10.0),), last_step_at=1000.0)
    assert eta_s(snap, now=1030.0) == 0.0


def test_stopping_shows_stopping_not_the_phase():
    snap = JobSnapshot(version=1, status="stopping", phase="training", steps=(_step(3),))
    assert t("train.status_stopping", "en") in progress_html(snap, "en", now=0.0)


def _run(val=25, batch=12, epoch_ends=0, epoch_end_s=0.0):
    cfg = TrainConfig(batch_size=batch)
    return Run(cfg=cfg, prec=None, tokenizer=None, train_ex=[], val_ex=[0] * val, model=None, optimizer=None,
               stepper=None, steps_per_epoch=16, num_steps=48, state=None, run_dir=Path("."), emit=lambda e: None,
               t0=0.0, epoch_end_s=epoch_end_s, epoch_ends=epoch_ends)


def test_before_the_first_epoch_end_its_time_is_estimated_from_the_validation_size():
    # 3 s a step: a forward 1 s; 3 validation batches of 12 and 151 probe tokens at 1/12 s each
    assert _run(val=25).epoch_end_s_estimate(step_s=3.0) == pytest.approx(3.0 + 151 / 12)


def test_after_an_epoch_end_its_measured_time_is_used():
    assert _run(epoch_ends=2, epoch_end_s=10.0).epoch_end_s_estimate(step_s=3.0) == 5.0


def test_tok_per_s_restarts_its_window_when_training_resumes():
    run = _run()
    run.state, run.metrics_file, run.window = SimpleNamespace(step=16), io.StringIO(), [5000, 0.0, 16]
    run.phase("training")
    assert run.window[0] == 0 and run.window[1] > 0.0


# --- one language ---------------------------------------------------------------------------------
def test_a_raw_cause_leaves_the_message_for_the_details_fold():
    error = DataFormatError(key="err.data.hub_failed", source="a/b", cause="ConnectionError: OfflineModeIsEnabled")
    message, cause = split_cause(error, "zh")
    assert (message, cause) == (t("err.data.hub_failed", "zh", source="a/b", cause=t("errors.cause_in_details", "zh")),
                                "ConnectionError: OfflineModeIsEnabled")


def test_the_details_fold_escapes_the_cause():
    assert details_html("<b>x</b>", "en") == ("<details class='rz-details'><summary>Details</summary>"
                                             "<code>&lt;b&gt;x&lt;/b&gt;</code></details>")


def test_the_offline_box_offers_nothing_once_demo_and_sample_are_applied():
    demo, sample = shell.offline_buttons("demo", "sample", look_at_disk=False)
    assert (demo["visible"], sample["visible"]) == (False, False)


def test_the_offline_box_offers_the_sample_while_the_data_is_a_hub_id():
    demo, sample = shell.offline_buttons("demo", "hfl/ruozhiba_gpt4", look_at_disk=False)
    assert (demo["visible"], sample["visible"]) == (False, True)


def test_public_mode_info_texts_offer_no_folder_or_path():
    for lang in ("zh", "en"):
        for key in ("app.model_info_public", "app.data_source_info_public"):
            assert not re.search("folder|path|文件夹|路径", t(key, lang)), (key, lang)


# --- install ---------------------------------------------------------------------------------
def _requirements() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-"))]


MACOS = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"}
WINDOWS = {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"}


@pytest.mark.parametrize("platform", [MACOS, WINDOWS], ids=["macos-arm64", "windows"])
def test_no_triton_only_package_installs_off_linux(platform):
    kept = [r.name for r in _requirements() if r.marker is None or r.marker.evaluate(platform)]
    assert "liger-kernel" not in kept and "triton" not in kept


def test_every_requirement_is_pinned():
    assert [r.name for r in _requirements() if not str(r.specifier).startswith("==")] == []
