"""``python -m rapidnet``: the same command line as ``rapidnet``."""

import sys

from rapidnet.cli.main import main

sys.exit(main())
