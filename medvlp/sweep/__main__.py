"""``python -m medvlp.sweep``."""

import sys

from medvlp.sweep.cli import main

sys.exit(main())
