import sys

from ombot.audit_agent.cli import main

sys.exit(main())
