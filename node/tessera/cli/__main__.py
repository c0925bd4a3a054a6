"""`python -m tessera.cli` runs the CLI."""

import sys

from tessera.cli import main

sys.exit(main())
