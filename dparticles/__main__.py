"""``python -m dparticles``: the ``dparticles`` command."""

import sys

from dparticles.cli import main

sys.exit(main())
