"""i18n: every key has every language, and t() formats."""

from ruozhi_ui.i18n import DEFAULT_LANG, LANGS, STRINGS, t


def test_every_key_has_every_language_non_empty():
    missing = [(k, lang) for k, v in STRINGS.items() for lang in LANGS if not (v.get(lang) or "").strip()]
    assert missing == []


def test_t_formats_with_context():
    assert t("train.progress_step", "en", step=3, num_steps=8) == "step 3/8"
    assert t("train.progress_step", "zh", step=3, num_steps=8) == "第 3/8 步"


def test_formatted_keys_take_the_same_fields_in_both_languages():
    import string

    fields = lambda s: sorted(f for _, f, _, _ in string.Formatter().parse(s) if f)
    assert [k for k, v in STRINGS.items() if fields(v["zh"]) != fields(v["en"])] == []


def test_a_default_language_text_names_one_translation():
    # ui/texts.py finds a Button's or a Markdown's key back from its text: that must be exact.
    seen = {}
    for entry in STRINGS.values():
        assert seen.setdefault(entry[DEFAULT_LANG], entry) == entry or seen[entry[DEFAULT_LANG]]["en"] == entry["en"]


def test_every_fixed_text_of_the_page_switches_language(tmp_path):
    from ruozhi_ui.ui.shell import build_app
    from ruozhi_ui.ui.texts import language_updates, translations

    items = translations(build_app(runs_root=tmp_path))
    by_id = {item.component.elem_id: update for item, update in zip(items, language_updates(items, "en"))}
    assert by_id["data-load"]["value"] == "Load data" and by_id["tab-train"]["label"] == "Train"
    assert by_id["compare-input"]["placeholder"].startswith("Type a question")
    assert by_id["data-source-kind"]["choices"] == [("Hub dataset", "hub"), ("Upload file", "upload"),
                                                     ("Bundled sample", "sample")]
    assert len(items) > 60
