"""``python -m sftbridge.cli``: the same as the ``sftbridge`` command."""

import sys

from sftbridge.cli import main

sys.exit(main())
