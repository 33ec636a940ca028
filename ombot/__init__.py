"""The base every package may use — config, storage, errors, logs, clock, process helpers — which
imports no other project package. The composition root (the CLI) lives in `ombot.app`."""

__version__ = "0.2.0"  # the one place: pyproject.toml (both distributions) and the envelope read it
