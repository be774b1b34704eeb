import sys

from rusty_rail.cli import main

sys.exit(main())
