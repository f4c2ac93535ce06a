import sys

from orchestrator_svc.cli import main

sys.exit(main())
