"""A newcomer reaches the first message by following only the README's first screen: this test
runs the exact code blocks of "Your first message in five minutes", in order, in a fresh copy of
the repository, against a fake DingTalk robot and a real Alertmanager. Only what cannot be the
same here is replaced: DingTalk's address (the fake's), the ports (free ones) and `python3`
(this interpreter)."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

import alertbridge
from tests.kit import IN_CI, ROOT, free_port, wait_until

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")


def walkthrough(readme="README.md"):
    """The (language, code) blocks of the first section, in order."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    section = text.split("\n## ")[1]
    return re.findall(r"^```(\w+)\n(.*?)^```", section, re.S | re.M)


def test_the_walkthrough_is_what_this_test_runs():
    kinds = [kind for kind, _ in walkthrough()]
    assert kinds == ["sh", "ini", "sh", "yaml", "sh", "ini", "text", "text"]
    assert walkthrough() == walkthrough("README.zh-CN.md")  # the same commands in both


DOCS = ["README.md", "README.zh-CN.md"] + sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")
)
# The addresses the docs may show: loopback, the reserved example names, a placeholder host
# (one word, such as HOST or alertmanager), DingTalk's own, and the real projects they name.
SHOWN_HOSTS = re.compile(
    r"(127\.0\.0\.1|localhost|(.+\.)?example\.com|[A-Za-z][\w-]*|(oapi|api|open)\.dingtalk\.com"
    r"|open\.(feishu\.cn|larksuite\.com)|qyapi\.weixin\.qq\.com)"  # the platforms' own
    r"(:\d+)?"
)
REAL_PROJECTS = {"https://github.com/timonwong/prometheus-webhook-dingtalk"}


def test_the_docs_show_no_invented_address():
    """Where to get alertbridge is this repository's files, as they are: no made-up address to
    clone or to read, in either language."""
    for name in DOCS:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "your-org" not in text, name
        for url in re.findall(r"https?://[^\s)`\"'<>\]]+", text):
            host = url.split("/")[2]
            assert SHOWN_HOSTS.fullmatch(host) or url in REAL_PROJECTS, f"{name}: {url}"
    start = walkthrough()[0][1]
    assert "git clone" not in start and "://" not in start


def test_the_test_command_says_what_it_installs_and_how_long_it_takes():
    """Before a contributor runs `bash tests/run`, the README says all it installs (every
    Debian package, the pip requirements, the venvs and the SQLite builds), how long it takes
    and how to skip the matrix, in both languages."""
    run = (ROOT / "tests" / "run").read_text(encoding="utf-8")
    packages = re.findall(r"packages\+=\(([\w-]+)\)", run)
    assert "prometheus-alertmanager" in packages and "fonts-noto-color-emoji" in packages
    assert "alertbridge-tests" in run and "ALERTBRIDGE_MATRIX" in run
    for readme in ("README.md", "README.zh-CN.md"):
        section = (ROOT / readme).read_text(encoding="utf-8").split("\n## ")[2]
        assert "bash tests/run" in section, readme
        for said in packages + [
            "tests/requirements.txt",
            "~/.cache/alertbridge-tests",
            "SQLite",
            "12",
            "15",
            "ALERTBRIDGE_MATRIX=0",
        ]:
            assert said in section, (readme, said)


RENDERED = re.compile(r"<!-- rendered: quick-start (\w+) -->\n```text\n(.*?)^```", re.S | re.M)


def readme_config(language):
    """config.ini as the README leaves it: step 3's robot, step 6's receiver, `language`."""
    robot, receiver = [code for kind, code in walkthrough() if kind == "ini"]
    text = (ROOT / "config.ini").read_text(encoding="utf-8")
    for block in (robot, receiver):
        head = re.escape(block.splitlines()[0])
        text = re.sub(rf"^{head}\n(?:[^\[].*\n|\n)*", block + "\n", text, count=1, flags=re.M)
    return text.replace("\nlanguage = zh\n", f"\nlanguage = {language}\n")


def readme_webhook():
    """What Alertmanager sends for step 5's alert through step 4's route."""
    fire = walkthrough()[4][1]
    words = shlex.split(fire.replace("\\\n", " "))[3:]
    alertname, rest = words[0], words[1:]
    labels = dict(w.split("=", 1) for w in rest if not w.startswith("--"))
    labels["alertname"] = alertname
    flags = [w[2:].split("=", 1) for w in rest if w.startswith("--")]
    annotations = dict(value.split("=", 1) for flag, value in flags if flag == "annotation")
    route = yaml.safe_load(walkthrough()[3][1])["route"]
    alert = {
        "status": "firing",
        "labels": labels,
        "annotations": annotations,
        "startsAt": "2026-11-30T02:13:05Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": dict(flags)["generator-url"],
        "fingerprint": "c0ffee0123456789",
    }
    return {
        "version": "4",
        "status": "firing",
        "receiver": route["receiver"],
        "groupLabels": {name: labels[name] for name in route["group_by"]},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "http://vm:9093",
        "groupKey": "{}:{alertname=\"DiskFull\", instance=\"db-3:9100\"}",
        "truncatedAlerts": 0,
        "alerts": [alert],
    }


def test_the_readme_sample_page_is_what_its_quick_start_sends(tmp_path):
    """The pages the README shows are what `--render` prints for the webhook of its own alert
    (step 5), route (step 4) and config (steps 3 and 6), in each language shown."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = dict(RENDERED.findall(readme))
    assert set(shown) == {"zh", "en"}
    assert dict(RENDERED.findall((ROOT / "README.zh-CN.md").read_text(encoding="utf-8"))) == shown
    payload = tmp_path / "webhook.json"
    payload.write_text(json.dumps(readme_webhook()), encoding="utf-8")
    for language, page in shown.items():
        config = tmp_path / f"config-{language}.ini"
        config.write_text(readme_config(language), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(ROOT / "alertbridge.py"), "-c", str(config)]
            + ["--render", str(payload)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        [request] = [json.loads(line) for line in done.stdout.splitlines()]
        markdown = request["markdown"]
        assert page == f"title: {markdown['title']}\n\n{markdown['text']}\n", language


def test_the_quick_start_gives_links_a_phone_can_open():
    """A first page links to Alertmanager and Prometheus by their own hosts' names, which no
    phone reaches: the quick start sets the receiver's alertmanager_url and prometheus_url
    (the keys configuration.md documents), and the page it shows links nowhere else."""
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for readme in ("README.md", "README.zh-CN.md"):
        quick_start = (ROOT / readme).read_text(encoding="utf-8").split("\n## ")[1]
        for key in ("alertmanager_url", "prometheus_url"):
            assert re.search(rf"^{key} = https://", quick_start, re.M), (readme, key)
            assert f"| `{key}` |" in reference, key
        for _, page in RENDERED.findall(quick_start):
            for url in re.findall(r"\]\((https?://[^)]+)\)", page):
                assert url.split("/")[2].endswith(".example.com"), url


def test_the_quick_start_says_what_to_do_without_custom_robots(tmp_path):
    """DingTalk announced in 2023 that custom robots are retired (自定义机器人产品下线): where
    添加机器人 offers no 自定义, step 1 says to ask the organisation's administrator, and what
    the app robot does instead; its claim that a receiver still needs a custom robot is the
    config's rule."""
    for readme, administrator, app in (
        ("README.md", "administrator", "docs/dingtalk-app.md"),
        ("README.zh-CN.md", "管理员", "docs/dingtalk-app.zh-CN.md"),
    ):
        step_1 = (ROOT / readme).read_text(encoding="utf-8").split("\n## ")[1].split("**2.")[0]
        assert "关于钉钉自定义机器人产品下线的公告" in step_1, readme
        assert "2023" in step_1 and administrator in step_1 and f"]({app})" in step_1, readme
    config = tmp_path / "config.ini"
    config.write_text("[receiver:default]\napp_group = cidX\n", encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError, match="list at least one robot"):
        alertbridge.load_config(str(config))


@pytest.fixture
def tools():
    if not (ALERTMANAGER and AMTOOL and shutil.which("curl")):
        if IN_CI:
            pytest.fail(
                "Alertmanager, amtool and curl are required in CI (tests/run installs them)"
            )
        pytest.skip("needs prometheus-alertmanager (with amtool) and curl")


def test_a_newcomer_gets_the_first_message_by_following_the_readme(tmp_path, fake, tools):
    clone = tmp_path / "alertbridge"
    clone.mkdir()
    for name in ("alertbridge.py", "config.ini"):
        shutil.copy(ROOT / name, clone / name)
    port, am_port = free_port(), free_port()
    token, secret = "newcomers-own-token-0123456789", "SECnewcomersownsecret"
    fake.add_robot(token, secret)
    fake_base = fake.url("x").split("/robot/")[0]

    def here(code):
        code = code.replace("https://oapi.dingtalk.com", fake_base)
        code = code.replace("9097", str(port)).replace("9093", str(am_port))
        return re.sub(r"^python3 ", f"{sys.executable} ", code, flags=re.M)

    config = clone / "config.ini"
    config.write_text(here(config.read_text(encoding="utf-8")), encoding="utf-8")
    start, robot, check, alertmanager_yml, fire = [code for _, code in walkthrough()[:5]]
    processes = []

    def background(command, **options):
        log = open(tmp_path / f"{len(processes)}.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **options)
        processes.append(process)
        return process

    def healthy():
        return subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/-/healthy"]).returncode == 0

    try:
        # 2. start, in a directory of the repository's two files: the daemon runs in the
        # foreground of its terminal
        [daemon_line] = start.strip().splitlines()
        background(["bash", "-c", "exec " + here(daemon_line)], cwd=clone)
        assert wait_until(healthy, timeout=30), (tmp_path / "0.log").read_text()

        # 3. the robot replaces [robot:default-1], with the newcomer's own token and secret
        robot = robot.replace("YOUR_ACCESS_TOKEN", token)
        robot = robot.replace("SEC_YOUR_SIGNING_SECRET", secret)
        text = config.read_text(encoding="utf-8")
        text = re.sub(
            r"^\[robot:default-1\]\n(?:[^\[].*\n|\n)*", here(robot) + "\n", text, flags=re.M
        )
        config.write_text(text, encoding="utf-8")
        for line in here(check).strip().splitlines():
            done = subprocess.run(["bash", "-c", line], cwd=clone, capture_output=True, text=True)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
        assert fake.wait_for(lambda f: any("AlertbridgeTest" in m.text for m in f.delivered()))

        # 4. Alertmanager with the README's configuration
        (tmp_path / "alertmanager.yml").write_text(here(alertmanager_yml), encoding="utf-8")
        background(
            [
                ALERTMANAGER,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ]
        )
        am_ready = ["curl", "-sf", f"http://127.0.0.1:{am_port}/-/ready"]
        assert wait_until(lambda: subprocess.run(am_ready).returncode == 0, timeout=60)

        # 5. fire: the page arrives after Alertmanager's group_wait (30 s)
        done = subprocess.run(["bash", "-c", here(fire)], cwd=clone, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert fake.wait_for(
            lambda f: any(
                "DiskFull" in m.body["markdown"]["title"]
                for m in f.delivered()
                if m.body.get("msgtype") == "markdown"
            ),
            timeout=90,
        )
        [page] = [m for m in fake.delivered() if "DiskFull" in m.text]
        assert page.body["markdown"]["title"] == "[CRITICAL · FIRING:1] DiskFull db-3:9100"
        assert "/data on db-3 is 95% full" in page.text
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
