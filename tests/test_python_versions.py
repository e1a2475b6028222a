"""Runs on the python3 that production servers ship (3.9 to 3.13); an older one is told so."""

import subprocess

import pytest

from tests.kit import (
    OLD_PYTHONS,
    ROOT,
    SCRIPT,
    SUPPORTED_PYTHONS,
    Daemon,
    load_fixture,
    post,
    require_python,
)

CAPTURED = (
    "am025-dev-firing.json",
    "am025-ops-firing-group.json",
    "am025-ops-partly-resolved.json",
)


@pytest.mark.parametrize("version", SUPPORTED_PYTHONS)
def test_daemon_delivers_captured_alertmanager_payloads(version, tmp_path, fake, sqlite_db):
    p = Daemon(tmp_path, fake.url, sqlite_db, python=require_python(version))
    try:
        p.wait_healthy()
        for name in CAPTURED:
            status, reply = post(p.url, load_fixture(name))
            assert status == 200, reply
        assert fake.wait_for(lambda f: len(f.delivered()) == 3, timeout=30), p.log.read_text()
        texts = [m.text for m in fake.delivered()]
        # 21:47:13.776597105Z, nanoseconds and all, shown in Asia/Shanghai (+08:00)
        assert any("TargetDown" in t and "2026-11-25 05:47:13" in t for t in texts)
        assert any("RESOLVED" in t and "10.0.0.1:9100" in t for t in texts)
    finally:
        assert p.stop() == 0, p.log.read_text()


@pytest.mark.parametrize("version", OLD_PYTHONS)
def test_older_python_gets_one_clear_line_and_exit_2(version):
    result = subprocess.run(
        [require_python(version), SCRIPT, "-c", "config.ini"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # no traceback
    assert (
        "needs Python 3.9 or newer" in result.stderr
        and f"this is Python {version}." in result.stderr
    )


def test_file_still_compiles_on_python_3_6():
    """The version check can only speak if the file parses: no syntax newer than 3.6."""
    check = f"compile(open({SCRIPT!r}, encoding='utf-8').read(), {SCRIPT!r}, 'exec')"
    result = subprocess.run(
        [require_python("3.6"), "-c", check], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
