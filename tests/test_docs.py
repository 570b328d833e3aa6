"""The documentation pages against the code they describe: every setting is documented,
every link between pages resolves. Reads files only."""

import dataclasses
import re
from pathlib import Path

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def documented_names(page: Path) -> set[str]:
    return set(re.findall(r"`([a-z_.]+)`", page.read_text(encoding="utf-8")))


def test_every_config_field_is_in_the_config_reference():
    names = documented_names(ROOT / "docs" / "config.md")
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "data")]
    fields += [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    fields += [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]
    missing = [name for name in fields if name not in names]
    assert missing == []


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
