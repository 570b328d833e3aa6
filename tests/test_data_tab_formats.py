"""The Data tab with datasets as people have them (issues 23, 24): what was detected, the column mapping and the
Hub choices going to the run, and the tab's texts following the language switch."""

import pytest

from ruozhi_ui.config import TrainConfig
from ruozhi_ui.data import ASSETS
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.policy import Policy
from ruozhi_ui.ui import data_tab, train_tab
from ruozhi_ui.ui.context import AppContext

CSV = str(ASSETS / "formats" / "qa.csv")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return AppContext(policy=Policy(mode="local", runs_root=root), runner=JobRunner(root))


def load(ctx, source, lang="en", columns=""):
    return data_tab.on_load(ctx, source, "demo", False, 10, lang, None, columns)


def test_the_summary_shows_the_detected_mapping_and_asks_to_check_a_guess(ctx):
    summary = load(ctx, CSV)[2]
    assert "Detected format and columns: `format=alpaca,instruction=question,output=answer`" in summary
    assert "guessed from the column names" in summary


def test_a_mapping_set_in_the_tab_reads_the_file_and_goes_to_the_run(ctx):
    out = load(ctx, CSV, columns="instruction=answer,output=question")
    assert out[0].columns == "instruction=answer,output=question" and out[-1]["source"] == CSV
    cfg = train_tab.build_train_config("demo", False, CSV, data_options=out[-1])
    assert cfg.data.columns == "instruction=answer,output=question"


def test_options_chosen_for_another_source_do_not_go_to_the_run(ctx):
    options = load(ctx, CSV, columns="instruction=answer,output=question")[-1]
    assert train_tab.build_train_config("demo", False, "sample", data_options=options).data.columns == ""


def test_a_bad_mapping_is_refused_before_loading(ctx):
    import gradio as gr

    with pytest.raises(gr.Error, match="Column mapping has no field 'question'"):
        load(ctx, CSV, columns="question=q")


@pytest.mark.parametrize("lang,origin,split", [("en", "bundled sample", "train"),
                                               ("zh", "内置样例", "训练用")])
def test_the_sample_s_origin_and_the_split_values_follow_the_language(ctx, lang, origin, split):
    out = load(ctx, "sample", lang)
    assert origin in out[2] and out[3]["data"][0][1] == split


def test_before_a_load_a_switch_renders_the_preview_headers_and_the_legend(ctx):
    out = data_tab.on_relabel(ctx, None, "", 1, 10, "all", "", 62, 151, 0, "", "en")
    assert out[1]["headers"] == ["#", "Split", "Instruction", "Output"]
    assert out[6].color_map == {"trained": data_tab.TRAINED_COLOR}


def test_a_switch_renders_the_inspector_summary_again(ctx):
    key = load(ctx, str(ASSETS / "formats" / "sharegpt.json"), "zh")[0]
    system = TrainConfig().data.system_prompt
    zh = data_tab.on_inspect(ctx, key, 0, system, 62, 151, "zh")[2]
    out = data_tab.on_relabel(ctx, key, "", 1, 10, "all", system, 62, 151, 0, "inspected text", "en")
    assert "历史" in zh and "history tokens" in out[7]
    assert list(out[6].color_map) == ["trained"]


def test_multi_turn_statistics_say_the_history_is_apart(ctx):
    key = load(ctx, str(ASSETS / "formats" / "sharegpt.json"))[0]
    truncation = data_tab.on_stats(ctx, key, "all", TrainConfig().data.system_prompt, 62, 151, "en")[2]
    assert "max_source_length bounds the last turn only" in truncation
