"""Fixtures: a fake DingTalk, history stores (SQLite and the real MariaDB), bridges in this
process and daemons in child processes. The helpers they use are in tests/kit.py."""

import pytest

import alertbridge
from tests.fakeapp import FakeApp
from tests.fakedingtalk import FakeDingTalk
from tests.kit import ROBOTS, Daemon, config_text, empty_mysql


@pytest.fixture
def fake():
    server = FakeDingTalk().start()
    for robot in ROBOTS.values():
        server.add_robot(robot["token"], robot.get("secret", ""), robot.get("keyword", ""))
    yield server
    server.stop()


@pytest.fixture
def app():
    """A fake DingTalk for the app robot: its OpenAPI and its Stream gateway (tests/fakeapp.py)."""
    server = FakeApp().start()
    yield server
    server.stop()


@pytest.fixture
def fast_fake(fake):
    fake.rate_window = 1.0  # 20 per second per token, as DingTalk allows 20 per minute
    return fake


@pytest.fixture(params=["sqlite", "mysql"])
def database(request, tmp_path):
    """History store settings, fresh for each test: an SQLite file, or the real MariaDB emptied."""
    if request.param == "sqlite":
        return alertbridge.Database(driver="sqlite", path=str(tmp_path / "history.db"))
    return empty_mysql()


@pytest.fixture
def sqlite_db(tmp_path):
    return alertbridge.Database(driver="sqlite", path=str(tmp_path / "history.db"))


@pytest.fixture
def make_bridge(tmp_path, fake):
    """make_bridge(database, start=True, clock=..., **config_text options) -> a Bridge on a
    free port."""
    bridges = []

    def make(database, start=True, clock=None, **options):
        path = tmp_path / "config.ini"
        path.write_text(config_text(fake.url, database, **options), encoding="utf-8")
        bridge = alertbridge.Bridge(
            alertbridge.load_config(str(path)), **({"clock": clock} if clock else {})
        )
        bridges.append(bridge)
        return bridge.start() if start else bridge

    yield make
    for bridge in bridges:
        bridge.stop()


@pytest.fixture
def daemon(tmp_path, fake, sqlite_db):
    """daemon(**Daemon options) -> alertbridge.py running as a child process, killed at the end."""
    started = []

    def start(**options):
        child = Daemon(tmp_path, fake.url, options.pop("database", sqlite_db), **options)
        started.append(child)
        return child

    yield start
    for child in started:
        child.kill()
