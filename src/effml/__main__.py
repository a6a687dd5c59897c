"""`python -m effml ...` (also what `torchrun -m effml run ...` starts on every rank)."""

import sys

from effml.cli import main

sys.exit(main())
