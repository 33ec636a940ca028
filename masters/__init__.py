"""Masters: the client library (this package's door for the CLI and the bot) and, in
`masters.server`, the master process itself. The master side never imports the bot."""

from masters.client import ConnectFailed, JobRef, MasterLink, MasterLost, NoMasterAvailable, Router
from masters.envelope import Refused
from masters.keys import Identity, KeyFileError
from masters.states import FINAL_STATES, JobState

__all__ = ["FINAL_STATES", "ConnectFailed", "Identity", "JobRef", "JobState", "KeyFileError", "MasterLink", "MasterLost",
           "NoMasterAvailable", "Refused", "Router"]
