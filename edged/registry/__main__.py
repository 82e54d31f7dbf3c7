"""`python -m edged.registry` is `edged-registry`."""

import sys

from edged.registry.cli import main

sys.exit(main())
