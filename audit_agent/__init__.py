"""The shell audit agent: a bash hook that spools each command line, and a small daemon that ships
the records to a master of its IDC (docs/audit.md). It runs on every server, so it imports only
its own code, the envelope and keys of `masters`, PyNaCl and rpyc: nothing of Slack, Ansible,
Salt or the databases."""

from ombot.audit_agent.cli import main

__all__ = ["main"]
