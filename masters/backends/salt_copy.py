"""The agent's wheels onto the minions the way `salt-cp --chunked` sends files (salt/cli/cp.py).

An install's AgentSetup needs the master's wheelhouse in /opt/ombot-agent/wheels on each host, where
Ansible's copy puts it too; agent_setup.py then checks every wheel's sha256. Salt's own `cp.recv_chunked`
takes a file one chunk at a time (`salt_cp_chunk_size` bytes of it, gzip-compressed, base64): the first
chunk of a file creates it (its directories made, its mode set), the others append. The job
(salt_job.py) publishes each chunk once to a whole batch of minions at once; a minion answers True, or
why its write failed. Nothing of the site's Salt set-up (file_roots, the fileserver) is used.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ombot.masters.backends import agent_setup
from ombot.masters.backends.salt_replies import Call, HostRun, Reply, StepFailed
from ombot.modules import AgentSetup, Plan

DEST = agent_setup.PREFIX / "wheels"
MODE = 0o644  # each wheel's, as Ansible's copy sets it
CHUNK_BYTES = 98304  # salt_cp_chunk_size's default in a salt-master's config (a site may set its own)
GZIP_LEVEL = 9  # salt-cp's (salt.utils.gzip_util.compress_file)


@dataclass(frozen=True)
class Piece:
    """One chunk of one wheel: where it comes from and whether it starts the file."""

    name: str
    offset: int


class WheelCopy:
    """The wheelhouse as cp.recv_chunked calls, one per chunk, made when first asked for: the hosts of a
    batch ask for the same one in turn, so only the latest is kept."""

    def __init__(self, house: Path, names: list[str], chunk_bytes: int) -> None:
        self.house, self.chunk_bytes, self.error = house, chunk_bytes, ""
        try:
            self.pieces = [Piece(name, offset) for name in sorted(names)
                           for offset in range(0, max(1, (house / name).stat().st_size), chunk_bytes)]
        except OSError as exc:  # every host fails with it
            self.pieces, self.error = [], f"the master's wheelhouse changed under the job: {exc}"
        self._made: tuple[int, Call] | None = None

    def program(self, host: HostRun) -> Generator[Call, Reply, None]:
        """One host's part: every chunk in order; the first write that fails ends it."""
        if self.error:
            raise StepFailed(self.error)
        for index, piece in enumerate(self.pieces):
            reply = yield self.call(index)
            if reply.ret is not True:
                raise StepFailed(f"copying the agent's wheels to {DEST} failed at {piece.name}: {_short(reply.ret)}")

    def call(self, index: int) -> Call:
        if self._made is None or self._made[0] != index:
            piece = self.pieces[index]
            with open(self.house / piece.name, "rb") as wheel:
                wheel.seek(piece.offset)
                data = gzip.compress(wheel.read(self.chunk_bytes), compresslevel=GZIP_LEVEL, mtime=0)
            self._made = index, Call("cp.recv_chunked", {
                "dest": str(DEST / piece.name), "chunk": base64.b64encode(data).decode("ascii"),
                "append": piece.offset > 0, "compressed": True, "mode": MODE})
        return self._made[1]


def wheel_copy(plan: Plan, check: bool, salt_opts: dict[str, Any]) -> WheelCopy | None:
    """The copy an install's AgentSetup needs before it runs, in chunks of the site's salt_cp_chunk_size
    (as salt-cp reads it from the salt-master's config); None for a removal or a check run (which writes
    nothing: the setup then says which wheels it would have copied)."""
    size = salt_opts.get("salt_cp_chunk_size")
    chunk_bytes = size if isinstance(size, int) and size > 0 else CHUNK_BYTES
    for step in plan.steps:
        if isinstance(step, AgentSetup) and step.action == "install" and step.wheelhouse and step.payload and not check:
            return WheelCopy(Path(step.wheelhouse), list(json.loads(step.payload)["wheels"]), chunk_bytes)
    return None


def preview_line(step: AgentSetup, check: bool) -> list[str]:
    """A dry run's view of the copy."""
    if step.action != "install" or check:
        return []
    return [f"cp.recv_chunked: the master's wheelhouse to {DEST}/, as salt-cp --chunked does, one publish per "
            "chunk for all the hosts of a batch"]


def _short(value: object) -> str:
    return str(value).strip()[:500]
