"""Packages and versions (issue 20): the two distributions built as a user builds them (`python -m build`)
and installed into fresh venvs, away from the repository: `ombot` (bot, masters, CLI) and `ombot-agent`
(the audit agent alone, run here on the oldest Python it supports, 3.9, against a real master); and the
version handshake of the envelope through a real master (docs/protocol.md, "Versions";
docs/packaging.md says what each distribution holds)."""

from __future__ import annotations

import email
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rpyc

import ombot
from ombot.envelope import REFUSAL_MAGIC, REPLY_MAGIC, SOFTWARE, Peer, Refused, Request, new_request
from ombot.keys import decode_public
from tests import envelope_010
from tests.attacker import still_serves
from tests.rigs import UID, AgentProcess, agent_cluster, stored
from tests.support import REPO, Cluster, wait_for

VERSION = ombot.__version__
AGENT_DIR = REPO / "packaging" / "agent"
# What a server must never get from ombot-agent: the bot's, the masters' and the CLI's libraries.
HEAVY = ("peewee", "typer", "slack_sdk", "slack_bolt", "ansible", "salt", "apscheduler")


def pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def clean_env() -> dict[str, str]:
    """This environment without the repository on the path: what runs must come from the venv."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("OMBOT_")}


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def skip_unless_index_answers(what: str, failed: subprocess.CompletedProcess[str], scratch: Path) -> None:
    """Fail with `failed`'s output, unless no package index answers at all: then skip, saying so."""
    probe = run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--dest",
                 str(scratch / "probe"), "rpyc>=6.0.2,<7"], scratch, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable for {what} (pip download rpyc: {probe.stderr.strip()[-300:]})")
    pytest.fail(f"{what} failed while the index answers:\n{failed.stdout[-3000:]}\n{failed.stderr[-3000:]}")


def build(source: Path, out: Path) -> tuple[Path, Path]:
    """`python -m build`: the sdist, then the wheel built from that sdist (build's default), into `out`."""
    done = run([sys.executable, "-m", "build", "--outdir", str(out), str(source)], out.parent)
    if done.returncode != 0:
        skip_unless_index_answers(f"building {source.name}", done, out.parent)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, (sdists, wheels, done.stdout[-2000:])
    return sdists[0], wheels[0]


def venv_with(python: str, root: Path, wheel: Path) -> Path:
    """A fresh venv of `python` with `wheel` installed, its dependencies from the configured index: its bin/."""
    subprocess.run([python, "-m", "venv", str(root)], check=True, capture_output=True)
    done = run([str(root / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", str(wheel)], root.parent)
    if done.returncode != 0:
        skip_unless_index_answers(f"installing {wheel.name}", done, root.parent)
    return root / "bin"


def wheel_files(wheel: Path) -> dict[str, bytes]:
    """Each file of the wheel but its metadata, with its content."""
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist() if ".dist-info/" not in n}


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def python_files(top: Path) -> list[Path]:
    """Every .py file under `top`, through the links to the rooms (Path.rglob does not follow them)."""
    return [Path(where) / name for where, _, names in os.walk(top, followlinks=True) for name in names
            if name.endswith(".py")]


def python39() -> str | None:
    """Python 3.9: `python3.9` on PATH, else pyenv's (a pyenv shim on PATH may name a version it lacks)."""
    found = [shutil.which("python3.9"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python")))]
    for python in filter(None, found):
        check = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], capture_output=True)
        if check.returncode == 0:
            return python
    return None


def spool_line(text: str) -> str:
    """One record as the bash hook writes it (audit_agent/hook.py), typed now by us."""
    return "\t".join(["om1", f"{time.time():.6f}", str(os.getpid()), "1", "0", "history", str(UID), "", "tester",
                      "/dev/pts/9", "", "/tmp", text, str(len(text))]) + "\n"


# -- one version, everywhere ---------------------------------------------------------------------------------


def test_the_version_is_written_once() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION
    for project in (REPO, AGENT_DIR):
        conf = pyproject(project)
        assert "version" not in conf["project"] and conf["project"]["dynamic"] == ["version"], project
        assert conf["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ombot.__version__"}, project
    assert f"## [{VERSION}]" in (REPO / "CHANGELOG.md").read_text()
    assert f"## To {VERSION}" in (REPO / "docs" / "upgrading.md").read_text()


def test_both_commands_say_their_version(tmp_path: Path) -> None:
    env = {**clean_env(), "PYTHONPATH": str(REPO)}
    # eager: before any config is looked for, so a missing one does not stop it
    shown = subprocess.run([sys.executable, "-m", "ombot", "--config", str(tmp_path / "none.toml"), "--version"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, f"ombot {VERSION}\n", "")
    agent = subprocess.run([sys.executable, "-m", "ombot.audit_agent", "--version"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert (agent.returncode, agent.stdout) == (0, f"ombot-agent {VERSION}\n")


def test_the_agent_distribution_pins_what_the_masters_pin() -> None:
    agent, full = pyproject(AGENT_DIR)["project"], pyproject(REPO)["project"]
    assert (agent["name"], agent["requires-python"]) == ("ombot-agent", ">=3.9")
    assert agent["scripts"] == {"ombot-agent": "ombot.audit_agent.cli:main"}
    assert agent["dependencies"] == ["pynacl>=1.5,<2", "rpyc>=6.0.2,<7", "tomli>=1.1; python_version < '3.11'"]
    for name in ("pynacl", "rpyc"):  # one wire, one library line on both ends
        assert [d for d in agent["dependencies"] if d.startswith(name)] == [d for d in full["dependencies"]
                                                                             if d.startswith(name)]


# -- ombot: sdist, a wheel from it, a fresh venv ---------------------------------------------------------------


@pytest.mark.slow
def test_ombot_builds_an_sdist_and_from_it_a_wheel_that_installs_and_runs(tmp_path: Path) -> None:
    sdist, wheel = build(REPO, tmp_path / "dist")
    assert (sdist.name, wheel.name) == (f"ombot-{VERSION}.tar.gz", f"ombot-{VERSION}-py3-none-any.whl")
    files = wheel_files(wheel)
    # only ombot/, every source file of it with the rooms it links in, as real files with their content
    source = {path.relative_to(REPO).as_posix(): path for path in python_files(REPO / "ombot")}
    assert set(files) == set(source)
    assert {n.split("/")[1] for n in files} >= {"bot", "masters", "modules", "audit", "approvals", "audit_agent", "app"}
    assert all(files[n] == p.read_bytes() for n, p in source.items())
    with tarfile.open(sdist) as tar:  # what the wheel was built from: real files, not links out of the tree
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    assert all(members[n].isfile() for n in source) and "pyproject.toml" in members and "README.md" in members

    bin_dir = venv_with(sys.executable, tmp_path / "venv", wheel)
    away = tmp_path / "elsewhere"
    away.mkdir()
    shown = run([str(bin_dir / "ombot"), "--version"], away)
    assert (shown.returncode, shown.stdout) == (0, f"ombot {VERSION}\n"), shown.stderr
    helped = run([str(bin_dir / "ombot"), "--help"], away)
    assert helped.returncode == 0 and "audit-agent" in helped.stdout and "master" in helped.stdout, helped.stderr
    where = run([str(bin_dir / "python"), "-c", "import ombot, ombot.bot, ombot.masters, ombot.app.cli; "
                 "print(ombot.__file__)"], away)
    assert where.stdout.startswith(str(tmp_path / "venv")), (where.stdout, where.stderr)


# -- ombot-agent on Python 3.9, shipping to a real master ---------------------------------------------------------


@pytest.fixture
def agent_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_the_agent_wheel_runs_on_python_39_and_ships_to_a_real_master(
        tmp_path: Path, make_cluster: Callable[..., Cluster], agent_procs: list[subprocess.Popen[bytes]]) -> None:
    python = python39()
    if python is None:
        pytest.skip("no Python 3.9 here (neither python3.9 on PATH nor ~/.pyenv/versions/3.9*): "
                    "the agent's oldest Python is what this test runs it on")
    sdist, wheel = build(AGENT_DIR, tmp_path / "dist")
    assert (sdist.name, wheel.name) == (f"ombot_agent-{VERSION}.tar.gz", f"ombot_agent-{VERSION}-py3-none-any.whl")
    base = {f"ombot/{name}.py": REPO / "ombot" / f"{name}.py" for name in ("__init__", "envelope", "keys", "tables", "errors",
                                                                                    "logs", "context")}
    agent = {f"ombot/audit_agent/{p.name}": p for p in (REPO / "audit_agent").glob("*.py")}
    files = wheel_files(wheel)
    assert set(files) == set(base) | set(agent)  # the agent and its seven base files: nothing else of OMBot
    assert all(files[n] == p.read_bytes() for n, p in {**base, **agent}.items())
    meta = metadata(wheel)
    assert (meta["Name"], meta["Version"], meta["Requires-Python"]) == ("ombot-agent", VERSION, ">=3.9")
    assert sorted(meta.get_all("Requires-Dist")) == ['pynacl<2,>=1.5', 'rpyc<7,>=6.0.2',
                                                     'tomli>=1.1; python_version < "3.11"']

    bin_dir = venv_with(python, tmp_path / "venv39", wheel)
    away = tmp_path / "elsewhere"
    away.mkdir()
    assert run([str(bin_dir / "python"), "-c", "import sys; print(sys.version_info[:2])"], away).stdout == "(3, 9)\n"
    helped = run([str(bin_dir / "ombot-agent"), "--help"], away)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: ombot-agent ") and "run" in helped.stdout, helped
    shown = run([str(bin_dir / "ombot-agent"), "--version"], away)
    assert (shown.returncode, shown.stdout) == (0, f"ombot-agent {VERSION}\n"), shown.stderr
    listed = run([str(bin_dir / "python"), "-m", "pip", "list", "--format", "json"], away)
    installed = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(listed.stdout)}
    assert {"pynacl", "rpyc", "tomli", "ombot-agent"} <= installed
    assert not installed & {"peewee", "typer", "slack-sdk", "slack-bolt", "ansible", "ansible-core", "salt",
                            "apscheduler", "ombot"}, installed
    probe = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % (HEAVY,)
    assert run([str(bin_dir / "python"), "-c", probe], away).stdout == "[]\n"

    cluster = agent_cluster(make_cluster)
    cluster.start("m1")
    spool_dir = tmp_path / "spool"
    (spool_dir / str(UID)).mkdir(parents=True, mode=0o700)
    config = AgentProcess(cluster, spool_dir, tmp_path / "state", ["m1"]).config  # writes agent.toml for web01
    log = tmp_path / "agent39.log"
    agent_procs.append(subprocess.Popen([str(bin_dir / "ombot-agent"), "run", "--config", str(config)], cwd=away,
                                        env=clean_env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True))
    (spool_dir / str(UID) / "spool").write_text(spool_line("echo typed-on-a-py39-server"))
    wait_for(lambda: any(d.get("command") == "echo typed-on-a-py39-server" for _, _, d in stored(cluster)),
             why=f"the event at the master; agent log:\n{log.read_text(errors='replace')}")
    [(event_id, kind, data)] = [row for row in stored(cluster) if row[2].get("command") == "echo typed-on-a-py39-server"]
    assert (kind, data["uid"]) == ("command", UID) and event_id.startswith("web01:")
    assert agent_procs[0].poll() is None  # still running, on 3.9, from the venv


# -- the version handshake through a real master ------------------------------------------------------------------


@pytest.mark.slow
def test_a_master_serves_old_and_new_clients_and_names_both_releases_for_a_later_one(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    cluster.start("m1")
    identity, master_key = cluster.identity(), decode_public(cluster.config().masters["m1"].public_key)
    peer = Peer(identity, master_key)
    conn = rpyc.connect("127.0.0.1", cluster.ports["m1"], config={"allow_pickle": False})
    try:
        sent = new_request("health", "m1", "cli:test", "cli", {}, rid="corr-42")
        reply = conn.root.health(peer.seal_request(sent))
        body = json.loads(peer.box.decrypt(reply[4:]))
        assert reply[:4] == REPLY_MAGIC and (body["v"], body["sw"]) == (1, SOFTWARE)
        assert body["result"]["version"] == VERSION

        old = envelope_010.Peer(identity, master_key)  # a client of 0.1.0, sending no sw
        old_sent = envelope_010.new_request("health", "m1", "cli:test", "cli", {})
        assert old.open_reply(conn.root.health(old.seal_request(old_sent)), old_sent)["master"] == "m1"

        later = Request(**{**new_request("health", "m1", "cli:test", "cli", {}).__dict__,
                           "version": 2, "software": "ombot 0.3.0"})
        with pytest.raises(Refused) as caught:
            peer.open_reply(conn.root.health(peer.seal_request(later)), later)
        assert (caught.value.code, caught.value.message) == (
            "unsupported_version", f"this master runs ombot {VERSION} and reads envelope version 1; the request is "
            "envelope version 2 from ombot 0.3.0: upgrade the master, or use a client of the same release line")

        frame = b"OMB2" + peer.seal_request(sent)[4:]  # a later frame layout: no key proven, no software told
        plain = conn.root.health(frame)
        assert plain[:4] == REFUSAL_MAGIC and json.loads(plain[4:])["error"]["code"] == "unsupported_version"
        assert f"ombot {VERSION}".encode() not in plain
    finally:
        conn.close()
    router = cluster.router()  # the client library of this release: served as before
    try:
        still_serves(cluster, router)
    finally:
        router.close()
