"""``python -m safeclip.cli ...``: the same as the ``safeclip`` command."""

import sys

from . import main

sys.exit(main())
