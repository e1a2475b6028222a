"""The READMEs: English and Chinese have the same sections, so they cannot drift apart, and every
link inside each one lands on a heading or an anchor it has."""

import re

import pytest

import alertbridge

from tests.kit import ROOT

READMES = ("README.md", "README.zh-CN.md")


def text(name):
    return (ROOT / name).read_text(encoding="utf-8")


def without_code(markdown):
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def headings(markdown):
    return [
        (len(m.group(1)), m.group(2).strip())
        for m in re.finditer(r"^(#{1,6}) (.+)$", without_code(markdown), re.M)
    ]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (CJK kept), spaces to
    hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", re.sub(r"<[^>]+>", "", heading)).lower()
    return "".join(c for c in heading if c.isalnum() or c in "-_ ").replace(" ", "-")


def test_both_readmes_have_the_same_sections_at_the_same_levels():
    english, chinese = headings(text("README.md")), headings(text("README.zh-CN.md"))
    assert [level for level, _ in english] == [level for level, _ in chinese], "\n".join(
        f"{a!s:60} {b}" for a, b in zip(english, chinese)
    )
    for (_, en), (_, zh) in zip(english, chinese):  # config sections keep their names
        assert re.findall(r"`\[[^\]]+\]`", en) == re.findall(r"`\[[^\]]+\]`", zh), (en, zh)


@pytest.mark.parametrize("name", READMES)
def test_each_readme_links_to_the_other_and_its_links_resolve(name):
    markdown = text(name)
    anchors = {slug(h) for _, h in headings(markdown)} | set(
        re.findall(r'<a id="([^"]+)">', markdown)
    )
    for target in re.findall(r"\]\(#([^)]+)\)", without_code(markdown)):
        assert target in anchors, f"{name}: no anchor #{target}"
    for path in re.findall(r"\]\(((?!https?:|#)[^)#]+)", without_code(markdown)):
        assert (ROOT / path).exists(), f"{name}: links to missing {path}"
    other = READMES[1 - READMES.index(name)]
    assert f"]({other})" in markdown.split("\n## ")[0]


def test_both_readmes_show_the_same_code():
    """Commands, configs and payloads are the same in both languages (comments aside)."""

    def blocks(markdown):
        return [
            re.sub(r"\s+#.*$|\s+;.*$", "", b, flags=re.M)
            for b in re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.S | re.M)
        ]

    english, chinese = blocks(text("README.md")), blocks(text("README.zh-CN.md"))
    assert len(english) == len(chinese)
    for en, zh in zip(english, chinese):
        if (
            "prometheus-webhook-dingtalk " in en
        ):  # the side-by-side picture has its captions translated
            continue
        assert en == zh


def test_every_metric_is_documented_in_both_readmes():
    for name in alertbridge.METRIC_HELP:
        for path in ("README.md", "README.zh-CN.md"):
            assert f"`{name}" in (ROOT / path).read_text(encoding="utf-8"), (
                f"{name} is not in {path}"
            )
