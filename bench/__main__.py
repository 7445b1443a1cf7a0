"""Run the fastloss benchmark suite: ``python -m bench [--quick] ...``."""

import sys

from fastloss.benchmarks import main

sys.exit(main())
