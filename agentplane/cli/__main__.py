import sys

from agentplane.cli import main

sys.exit(main())
