"""``python -m lorad.daemon`` is ``lorad serve``."""

import sys

from .cli import main

sys.exit(main())
