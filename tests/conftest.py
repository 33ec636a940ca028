from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import sshd
from tests.support import Cluster

if TYPE_CHECKING:
    from tests.rigs import SlackRig


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
