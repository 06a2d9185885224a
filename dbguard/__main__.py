"""`python -m dbguard`: the same command line as the `dbguard` script."""
import sys

from .cli import main

sys.exit(main())
