"""The README documents every config key, so the reference cannot silently fall behind."""

from __future__ import annotations

import dataclasses

from conftest import REPO

from llmctl.config import Config


def test_every_config_key_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = []
    for section in dataclasses.fields(Config()):
        for field in dataclasses.fields(getattr(Config(), section.name)):
            key = f"{section.name}.{field.name.rstrip('_')}"  # sft.from_ is written sft.from
            if f"`{key}`" not in readme:
                missing.append(key)
    assert missing == [], f"README's config reference lacks {missing}"
