"""`python -m progdistill.cli ...` (torchrun runs the CLI this way)."""

import sys

from progdistill.cli.main import main

sys.exit(main())
