"""Where servers are: the container image, the Kubernetes example, the systemd unit and its
drop-in for RHEL 8. This machine has no container engine and no registry for base images, so the
Containerfile's own steps are carried out here instead: its files copied where it puts them (under
a directory that stands for the image's root), its RUN edit applied, the daemon started with its
ENV, ENTRYPOINT and CMD as its USER, and its HEALTHCHECK run against it."""

import configparser
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest
import yaml

import alertbridge
from tests.kit import ROOT, free_port, wait_until

PYTHON = "/usr/bin/python3"  # a Python other users can run: pyenv's lives under /root


def instructions(path=ROOT / "Containerfile"):
    """[(INSTRUCTION, arguments)] of a Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def one(kind):
    [value] = [rest for word, rest in instructions() if word == kind]
    return value


def exec_form(text):
    return yaml.safe_load(text)  # a JSON array


def test_the_image_is_slim_python_with_pymysql_a_user_of_its_own_and_a_state_volume():
    assert re.fullmatch(r"python:3\.(9|1[0-3])-slim", one("FROM"))
    [install, *_] = [rest for word, rest in instructions() if word == "RUN"]
    assert re.search(r"pip install --no-cache-dir \"pymysql==[0-9.]+\"", install)
    assert "useradd --system --uid 10001" in install
    assert one("USER") == "alertbridge"
    env = dict(pair.split("=", 1) for pair in shlex.split(one("ENV")))
    assert one("VOLUME") == env["STATE_DIRECTORY"] == "/var/lib/alertbridge"
    assert one("EXPOSE") == str(alertbridge.Service.port)


@pytest.fixture
def image():
    """The image's stand-in root: a directory the image's user can reach (pytest's own are
    readable by root only)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="alertbridge-image-"))
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as the image's user: needs root")
def test_the_image_steps_give_a_daemon_that_answers_its_health_check(image):
    port = free_port()

    def inside(text):  # a path of the image, under its stand-in root
        return re.sub(r"(?<![\w.])/(app|etc|var)/", lambda m: f"{image}/{m.group(1)}/", text)

    for word, rest in instructions():
        if word == "COPY":
            source, target = rest.split()
            os.makedirs(os.path.dirname(inside(target)), exist_ok=True)
            shutil.copy(ROOT / source, inside(target))
        elif word == "RUN" and rest.startswith("sed "):
            subprocess.run(inside(rest), shell=True, check=True)
    env = dict(pair.split("=", 1) for pair in shlex.split(one("ENV")))
    state = inside(env["STATE_DIRECTORY"])
    os.makedirs(state)
    os.chown(state, 10001, 10001)
    config = inside("/etc/alertbridge/config.ini")
    text = open(config, encoding="utf-8").read()
    assert re.search(r"^listen = 0\.0\.0\.0$", text, re.M)  # reachable from outside
    with open(config, "w", encoding="utf-8") as fh:  # this test's port, not the image's
        fh.write(text.replace("port = 9097", f"port = {port}"))
    for path in (image, *image.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    command = exec_form(one("ENTRYPOINT")) + exec_form(one("CMD"))
    command = [PYTHON if part == "python3" else inside(part) for part in command]
    user = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]
    daemon = subprocess.Popen(
        user + command,
        env={**env, "STATE_DIRECTORY": state, "PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        check = exec_form(re.sub(r"^(--\S+\s+)*CMD\s+", "", one("HEALTHCHECK")))
        check = [PYTHON if part == "python3" else part.replace("9097", str(port)) for part in check]

        def healthy():
            return subprocess.run(user + check, capture_output=True).returncode == 0

        assert wait_until(healthy, timeout=30), daemon.stdout.read1().decode(errors="replace")
        assert os.stat(os.path.join(state, "journal.db")).st_uid == 10001
    finally:
        daemon.terminate()
        daemon.wait(30)


def kubernetes_example():
    text = (ROOT / "docs" / "high-availability.md").read_text(encoding="utf-8")
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: StatefulSet" in b]
    return {doc["kind"]: doc for doc in yaml.safe_load_all(block)}


def test_the_kubernetes_example_config_loads_with_its_secret_and_fits_its_statefulset(
    tmp_path, monkeypatch
):
    objects = kubernetes_example()
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    secret = objects["Secret"]["stringData"]

    # the Secret as the pod sees it: files under the secrets mount, a variable from secretKeyRef
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    [secrets_volume] = [v for v in pod["volumes"] if v["name"] == "secrets"]
    for item in secrets_volume["secret"]["items"]:
        (secrets_dir / item["path"]).write_text(secret[item["key"]])
    for name, variable in env.items():
        if "valueFrom" in variable:
            monkeypatch.setenv(name, secret[variable["valueFrom"]["secretKeyRef"]["key"]])
    text = objects["ConfigMap"]["data"]["config.ini"]
    text = text.replace(mounts["secrets"]["mountPath"], str(secrets_dir))
    (tmp_path / "config.ini").write_text(text, encoding="utf-8")
    config = alertbridge.load_config(str(tmp_path / "config.ini"))

    assert config.service.listen == "0.0.0.0"  # the probes and Alertmanager reach the pod
    port = config.service.port
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": port}
    assert objects["Service"]["spec"]["clusterIP"] == "None"  # each pod by its own name
    assert [p["port"] for p in objects["Service"]["spec"]["ports"]] == [port]
    assert config.cluster.enabled and config.database.driver == "mysql"
    assert config.cluster.instances == objects["StatefulSet"]["spec"]["replicas"]
    assert config.database.password == secret["mysql-password"]
    robot = config.routes["ops"].robots[0]
    assert (robot.token, robot.secret) == (secret["ops-1-token"], secret["ops-1-secret"])
    # the image's command takes the config where the ConfigMap is mounted
    assert container["args"] == exec_form(one("CMD"))
    assert mounts["config"]["mountPath"] == container["args"][1]
    assert env["STATE_DIRECTORY"]["value"] == mounts["state"]["mountPath"] == one("VOLUME")
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user


def test_the_rhel8_drop_in_runs_the_unit_command_with_another_python():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "alertbridge.service", encoding="utf-8")
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    [drop_in] = [b for b in re.findall(r"```ini\n(.*?)```", text, re.S) if "ExecStart=\n" in b]
    lines = drop_in.splitlines()
    assert lines[:2] == ["[Service]", "ExecStartPre="] and "ExecStart=" in lines
    starts = dict(line.split("=", 1) for line in lines[1:] if not line.endswith("="))
    for key, value in starts.items():
        ignoring = unit["Service"][key].startswith("-")  # ExecStartPre=-: as the unit does
        assert value.split()[0] == "-" * ignoring + "/usr/bin/python3.9", key
        assert value.split()[1:] == unit["Service"][key].split()[1:], key
    assert "LoadCredential=" in (ROOT / "alertbridge.service").read_text()
