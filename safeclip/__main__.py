"""``python -m safeclip ...``: the same as the ``safeclip`` command."""

import sys

from .cli import main

sys.exit(main())
