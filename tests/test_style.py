"""The code as the brief wants it read: no line over 100 columns, in the daemon, the tests and
the benchmarks."""

import ast
import re

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


def test_the_map_names_every_thread_and_lock_the_code_makes():
    """The docstring at the top of alertbridge.py names the threads the code starts and the
    locks it makes: one made and not named (or named and gone) fails here."""
    import ast
    import re

    import alertbridge

    tree = ast.parse((ROOT / "alertbridge.py").read_text(encoding="utf-8"))
    locks, threads = set(), set()
    kinds = {"threading.Lock", "threading.RLock", "threading.Condition", "threading.Semaphore"}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                if ast.unparse(node.value.func) in kinds:
                    locks |= {f"{cls.name}.{ast.unparse(t)[5:]}" for t in node.targets}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        named = {k.arg: k.value for k in node.keywords}.get("name")
        if called == "threading.Thread" and isinstance(named, ast.Constant):
            threads.add(named.value)
        elif called == "threading.Thread" and isinstance(named, ast.JoinedStr):
            threads.add(ast.unparse(named).split("{")[0][2:] + "N")  # f"sender-{n}": sender-N
        elif called == "super().__init__" and node.args and isinstance(node.args[0], ast.Constant):
            threads.add(node.args[0].value)  # a Worker's name is its thread's
    doc = alertbridge.__doc__
    threads_paragraph = doc[doc.index("Threads:"):doc.index("Locks,")]
    locks_paragraph = doc[doc.index("Locks,"):doc.index("Where a change goes")]
    assert set(re.findall(r'"([a-z]+(?:-N)?)"', threads_paragraph)) == threads
    assert set(re.findall(r"\b([A-Z][A-Za-z]+\._[a-z_]+)", locks_paragraph)) == locks


WHERE = re.compile(r"`([\w.]+)`(?:…`([\w.]+)`)? \(lines (\d+)–(\d+)\)")


def definitions():
    """{name: (first line, last line)} of alertbridge.py's top-level definitions and methods
    (Class.method)."""
    found = {}
    for node in ast.parse((ROOT / "alertbridge.py").read_text(encoding="utf-8")).body:
        names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names = [node.name]
            for method in node.body if isinstance(node, ast.ClassDef) else ():
                if isinstance(method, ast.FunctionDef):
                    found[f"{node.name}.{method.name}"] = (method.lineno, method.end_lineno)
        for name in names:
            found[name] = (node.lineno, node.end_lineno)
    return found


def sections():
    """{section number: (first line, last line)} of alertbridge.py's "# N. Title" headers."""
    lines = (ROOT / "alertbridge.py").read_text(encoding="utf-8").split("\n")
    headers = [(re.match(r"# (\d+)\. ", line), n) for n, line in enumerate(lines, 1)]
    starts = [(int(m[1]), n) for m, n in headers if m]
    ends = [n - 2 for _, n in starts[1:]] + [len(lines)]
    return {number: (start, end) for (number, start), end in zip(starts, ends)}


@pytest.mark.parametrize("page", ["docs/development.md", "docs/development.zh-CN.md"])
def test_where_a_change_goes_names_the_lines_and_sections_as_the_code_is(page):
    """The table in docs/development.md: each change's definitions at the lines it gives, in
    the sections it names (at most two). When the code moves, the message is the table's
    new ranges."""
    text = (ROOT / page).read_text(encoding="utf-8")
    rows = [line for line in text.split("\n") if line.startswith("| ") and WHERE.search(line)]
    assert len(rows) == 4, "a row for each of the four changes"
    found, parts, wrong = definitions(), sections(), []
    for row in rows:
        named = [int(n) for n in re.findall(r"\b(\d+)\. [A-Z]", row.split("|")[2])]
        assert 1 <= len(named) <= 2, row
        for first, last, start, end in WHERE.findall(row):
            actual = (found[first][0], found[last or first][1])
            if actual != (int(start), int(end)):
                named_as = f"`{first}`" + (f"…`{last}`" if last else "")
                wrong.append(named_as + " (lines %d–%d)" % actual)
            assert any(parts[n][0] <= actual[0] <= actual[1] <= parts[n][1] for n in named), row
    assert wrong == [], "the ranges are now: " + "; ".join(wrong)
