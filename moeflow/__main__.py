"""`python -m moeflow ...` is the `moeflow` command (torchrun starts ranks this way)."""

import sys

from moeflow.launch.cli import main

sys.exit(main())
