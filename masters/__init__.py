"""Masters: the client library (this package's door for the CLI and the bot) and the master
process itself, started through `serve_master`. The master side never imports the bot; its
internals (core, server, backends, stores) are reached only through this door."""

from __future__ import annotations

from pathlib import Path

from ombot.masters.client import ConnectFailed, JobLookup, JobRef, MasterLink, MasterLost, NoMasterAvailable, Router
from ombot.envelope import Refused
from ombot.keys import Identity, KeyFileError
from ombot.masters.report import host_log, host_rows
from ombot.masters.states import FINAL_STATES, JobState
from ombot.config import Config, MasterSettings

__all__ = ["FINAL_STATES", "ConnectFailed", "Identity", "JobLookup", "JobRef", "JobState", "KeyFileError", "MasterLink", "MasterLost",
           "NoMasterAvailable", "Refused", "Router", "host_log", "host_rows", "serve_master"]


def serve_master(config: Config, settings: MasterSettings, ready_file: Path | None = None) -> None:
    """Run one master until SIGTERM or SIGINT (its rpyc server, modules and backend load only here)."""
    from ombot.masters.server import serve

    serve(config, settings, ready_file)
