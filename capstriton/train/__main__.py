"""``python -m capstriton.train``."""

import sys

from . import main

sys.exit(main())
