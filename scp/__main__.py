"""``python -m scp`` is the ``imagingstudy-scp`` command."""

import sys

from scp.cli import main

sys.exit(main())
