import sys

from kolora_probe.monitor.recorder import main

sys.exit(main())
