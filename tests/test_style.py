"""The code as the brief wants it read: no line over 100 columns, in the daemon, the tests and
the benchmarks."""

import pytest

from tests.kit import ROOT

FILES = sorted([ROOT / "alertbridge.py", *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_line_is_over_100_columns(path):
    long = [
        n
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1)
        if len(line) > 100
    ]
    assert long == [], f"{path.name}: lines {long}"
