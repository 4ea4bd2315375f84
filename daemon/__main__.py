"""``python -m lorad.daemon`` is ``lorad serve``."""

import sys

from lorad.client.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
