import sys

from monitor_svc.cli import main

sys.exit(main())
