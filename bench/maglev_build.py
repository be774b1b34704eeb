"""The Maglev build benchmark, kept here for `bench/run.py`; it lives in rusty_rail.bench.maglev_build."""

import sys

from rusty_rail.bench.maglev_build import main

if __name__ == "__main__":
    sys.exit(main())
