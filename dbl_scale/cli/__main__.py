"""`python -m dbl_scale.cli`: the same as the `dbl-scale` command."""
import sys

from .main import main

sys.exit(main())
