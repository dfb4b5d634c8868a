"""``python -m vfnb``: see :mod:`vfnb.cli`."""
import sys

from vfnb.cli import main

sys.exit(main())
