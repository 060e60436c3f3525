"""`python -m modeling_ttt.evaluation ...` (and `accelerate launch -m modeling_ttt.evaluation ...`): `ttt-eval`."""

import sys

from .cli import main

sys.exit(main())
