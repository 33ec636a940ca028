"""The fixtures every suite may ask for by name, without importing them (docs/testing.md, "Writing a
suite with the rigs"): sshd hosts, clusters and Slack rigs, the database engines, and the audit's
alert poster and rigs. A suite's own fixture of the same name wins in its file (test_playbook's
`slack`, test_job_lifecycle's `make_rig`). Heavy imports stay inside the fixtures: a suite pays
only for what it uses."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import sshd
from tests.storage import BACKENDS, scratch
from tests.support import Cluster

if TYPE_CHECKING:
    import peewee

    from ombot.timers import Timers
    from tests.fakeslack import FakeSlack
    from tests.rigs import AuditRig, SlackRig


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.SshHosts]:
    """Two real sshd "hosts" on loopback, web01 and web02, for the file (tests/sshd.py)."""
    if not sshd.available():
        pytest.skip("needs openssh-server (sshd)")
    started = sshd.SshHosts(tmp_path_factory.mktemp("sshd"), ["web01", "web02"]).start()
    yield started
    started.stop()


@contextmanager
def _clusters(root: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(idcs: dict[str, list[str]] | None = None, **kw: Any) -> Cluster:
        cluster = Cluster(root / f"cluster{len(made)}", idcs or {"local": ["m1"]}, **kw)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop_all()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build a cluster config: make_cluster({"bj": ["bj-1", "bj-2"]}, limits={...}); its masters are
    stopped at the end of the test."""
    with _clusters(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def make_module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Cluster]]:
    """make_cluster for a cluster that serves a whole file (its masters stopped at the file's end)."""
    with _clusters(tmp_path_factory.mktemp("clusters")) as make:
        yield make


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Iterator[Cluster]:
    """One IDC ("local") with one running master ("m1")."""
    c = make_cluster()
    c.start("m1")
    yield c


@pytest.fixture
def router(cluster: Cluster):
    r = cluster.router()
    yield r
    r.close()


def _rig_maker(stack: ExitStack, root: Path) -> Callable[..., "SlackRig"]:
    from tests.rigs import slack_rig  # the rigs import the bot: only suites that use one pay for it

    numbers = itertools.count()

    def make(*args: Any, **kw: Any) -> "SlackRig":
        return stack.enter_context(slack_rig(root / f"rig{next(numbers)}", *args, **kw))
    return make


@pytest.fixture
def make_slack_rig(tmp_path: Path) -> Iterator[Callable[..., "SlackRig"]]:
    """Slack rigs for one test: make_slack_rig(policy=POLICY, extra_toml=floor("m1"), **[bot] keys)
    (tests/rigs/slack.py, slack_rig); each stopped, and checked for breaches of Slack's rules, at its end."""
    with ExitStack() as stack:
        yield _rig_maker(stack, tmp_path)


@pytest.fixture(scope="module")
def make_module_slack_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., "SlackRig"]]:
    """make_slack_rig for rigs that serve a whole file: one master and bot start, every test finds its
    own requests again by the numbers the bot answers with."""
    with ExitStack() as stack:
        yield _rig_maker(stack, tmp_path_factory.mktemp("rigs"))


# -- the databases (tests/storage.py): every store on SQLite, and on PostgreSQL and MySQL in the full run --


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The engine's name: "sqlite", "postgres" or "mysql"."""
    return request.param


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty place for tables on `backend`, removed at the end of the test."""
    with scratch(backend, tmp_path) as url:
        yield url


@pytest.fixture
def master_db(store_url: str) -> Iterator["peewee.Database"]:
    """The master's models bound to a fresh, migrated database."""
    from ombot.masters import store

    db = store.open_store(store_url)
    yield db
    db.close()


# -- the audit's alerts: the poster over the real Slack transport, and rigs whose bot pulls the audit --


@pytest.fixture
def slack() -> Iterator[tuple["FakeSlack", Any]]:
    """A fake Slack and the bot's real SlackTransport talking to it; any breach of Slack's rules fails the test."""
    from ombot.bot.settings import SlackSecrets
    from ombot.bot.slack_app import SlackTransport, web_client
    from tests.fakeslack import FakeSlack

    with FakeSlack() as fake:
        transport = SlackTransport(web_client(SlackSecrets(fake.bot_token, None, None, fake.url)))
        yield fake, transport
        fake.assert_no_violations()


@pytest.fixture
def timers() -> Iterator["Timers"]:
    """The bot's scheduler, as bot.jobs.Lifecycle starts it: the poster's retries are jobs on it."""
    from ombot.timers import Timers

    timers = Timers()
    timers.scheduler.start()
    yield timers
    timers.scheduler.shutdown(wait=False)


@pytest.fixture
def make_rig(make_slack_rig: Callable[..., "AuditRig"]) -> Callable[..., "AuditRig"]:
    """AuditRigs on ALERT_RULES (tests/rigs/audit.py): make_rig(["m1", "m2"], limits={...}, **[bot] keys)."""
    from tests.rigs import ALERT_RULES, AuditRig, audit_site

    def make(masters: list[str], limits: dict[str, int] | None = None, more_agents: tuple[str, ...] = (),
             **settings: Any) -> AuditRig:
        """A rig whose masters have `limits`, with agent keys for web01, web02 and `more_agents` hosts."""
        return make_slack_rig({"local": masters}, kind=AuditRig, limits=limits or {},
                              **audit_site(ALERT_RULES, more_agents), **settings)
    return make
