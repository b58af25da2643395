"""``python -m character_training`` is the package CLI (see `character_training.cli`)."""

import sys

from .cli import main

sys.exit(main())
