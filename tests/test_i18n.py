"""i18n: every key has every language, and t() formats."""

from ruozhi_ui.i18n import LANGS, STRINGS, gradio_i18n_tables, t


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


def test_gradio_tables_have_every_key_per_language():
    tables = gradio_i18n_tables()
    assert sorted(tables) == sorted(LANGS)
    assert all(set(tables[lang]) == set(STRINGS) for lang in LANGS)
