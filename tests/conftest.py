from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import Cluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build a cluster config: make_cluster({"bj": ["bj-1", "bj-2"]}, limits={...})."""
    made: list[Cluster] = []

    def make(idcs: dict[str, list[str]] | None = None, **kw) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", idcs or {"local": ["m1"]}, **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop_all()


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
