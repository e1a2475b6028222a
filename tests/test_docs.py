"""The documentation: the README and each page of docs/ in English and Chinese have the same
sections and code, so a pair cannot drift apart, and every link lands on a file, a heading or an
anchor."""

import re

import pytest

import alertbridge

from tests.kit import ROOT

PAIRS = [("README.md", "README.zh-CN.md")] + [
    (f"docs/{p.name}", f"docs/{p.stem}.zh-CN.md")
    for p in sorted((ROOT / "docs").glob("*.md"))
    if not p.name.endswith(".zh-CN.md")
]
PAGES = [page for pair in PAIRS for page in pair]


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


def anchors(name):
    markdown = text(name)
    return {slug(h) for _, h in headings(markdown)} | set(re.findall(r'<a id="([^"]+)">', markdown))


def test_every_page_has_its_translation():
    assert (ROOT / "docs" / "configuration.md").exists()
    for english, chinese in PAIRS:
        assert (ROOT / chinese).exists(), f"{english} has no {chinese}"
    names = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert names == {page for page in PAGES if page.startswith("docs/")}


@pytest.mark.parametrize("english, chinese", PAIRS)
def test_both_languages_have_the_same_sections_at_the_same_levels(english, chinese):
    english, chinese = headings(text(english)), headings(text(chinese))
    assert [level for level, _ in english] == [level for level, _ in chinese], "\n".join(
        f"{a!s:60} {b}" for a, b in zip(english, chinese)
    )
    for (_, en), (_, zh) in zip(english, chinese):  # config sections keep their names
        assert re.findall(r"`\[[^\]]+\]`", en) == re.findall(r"`\[[^\]]+\]`", zh), (en, zh)


@pytest.mark.parametrize("name", PAGES)
def test_each_page_links_to_its_translation_and_its_links_resolve(name):
    markdown, here = text(name), (ROOT / name).parent
    for target in re.findall(r"\]\(#([^)]+)\)", without_code(markdown)):
        assert target in anchors(name), f"{name}: no anchor #{target}"
    for path, anchor in re.findall(
        r"\]\(((?!https?:|#)[^)#]+)(?:#([^)]+))?\)", without_code(markdown)
    ):
        assert (here / path).exists(), f"{name}: links to missing {path}"
        if anchor:
            linked = (here / path).resolve().relative_to(ROOT).as_posix()
            assert anchor in anchors(linked), f"{name}: {path} has no anchor #{anchor}"
    pair = next(p for p in PAIRS if name in p)
    translation = pair[1 - pair.index(name)].split("/")[-1]
    assert f"]({translation})" in markdown.split("\n## ")[0], f"{name}: no link to {translation}"


@pytest.mark.parametrize("english, chinese", PAIRS)
def test_both_languages_show_the_same_code(english, chinese):
    """Commands, configs and payloads are the same in both languages (comments aside)."""

    def blocks(markdown):
        return [
            re.sub(r"\s+#.*$|\s+;.*$", "", b, flags=re.M)
            for b in re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.S | re.M)
        ]

    english, chinese = blocks(text(english)), blocks(text(chinese))
    assert len(english) == len(chinese)
    for en, zh in zip(english, chinese):
        if (
            "prometheus-webhook-dingtalk " in en
        ):  # the side-by-side picture has its captions translated
            continue
        assert en == zh


def test_every_metric_is_documented_in_both_languages():
    for name in alertbridge.METRIC_HELP:
        for path in ("docs/operations.md", "docs/operations.zh-CN.md"):
            assert f"`{name}" in (ROOT / path).read_text(encoding="utf-8"), (
                f"{name} is not in {path}"
            )


def chinese_prose():
    """(name, text, prose) of each zh-CN page and of the Chinese string literals of
    alertbridge.py; the prose is without code spans, code blocks and anchors: the words a
    reader of Chinese reads."""
    source = (ROOT / "alertbridge.py").read_text(encoding="utf-8")
    literals = re.findall(r'"[^"\n]*[\u4e00-\u9fff][^"\n]*"', source)
    yield "alertbridge.py", "\n".join(literals), "\n".join(literals)
    for _, chinese in PAIRS:
        prose = re.sub(r"`[^`\n]*`|<a id=\"[^\"]*\">", "", without_code(text(chinese)))
        yield chinese, text(chinese), prose


def test_chinese_says_one_thing_one_way():
    """A webhook accepted is 返回 200; what the history keeps of an incident is an 事件记录,
    not a 日志 (that is the log); the instance that sends is the 领导者, in every page; a robot
    alertbridge no longer uses is 停用, so that 轮值 (the on-call rotation) means one thing."""
    for name, whole, prose in chinese_prose():
        assert not re.search(r"回答了?\s*[\"“]?200", whole), name
        assert not re.search(r"acknowledged`?\s*日志", whole), name
        assert "leader" not in prose, name
        assert "轮转" not in prose, name
    assert "领导者" in text("docs/high-availability.zh-CN.md")
    assert "领导者" in text("docs/dingtalk-app.zh-CN.md")
    assert "停用" in text("README.zh-CN.md") and "轮值" in text("README.zh-CN.md")
