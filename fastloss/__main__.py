"""Run the command line as ``python -m fastloss``."""

from .cli import main

raise SystemExit(main())
