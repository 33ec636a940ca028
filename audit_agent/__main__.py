import sys

from audit_agent.cli import main

sys.exit(main())
