import sys

from kolora_probe.cli.main import main

sys.exit(main())
