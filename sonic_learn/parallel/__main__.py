"""``python -m sonic_learn.parallel``: see ``sonic_learn.parallel.demo`` (the worker must live in an
importable module for the spawned ranks, so the code is there)."""

import sys

from sonic_learn.parallel.demo import main

sys.exit(main())
