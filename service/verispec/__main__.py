"""`python -m verispec` is the `verispec` command."""

import sys

from verispec.cli import main

sys.exit(main())
