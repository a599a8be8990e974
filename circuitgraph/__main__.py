"""``python -m circuitgraph`` (and ``torchrun -m circuitgraph``) runs the command line."""

import sys

from circuitgraph.cli import main

sys.exit(main())
