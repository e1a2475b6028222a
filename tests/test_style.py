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
