"""Run the fastloss benchmark suite: ``python bench/run.py [--quick] ...``.

Run as a script, this file's folder is first on ``sys.path``, so the
repository root is added in front of it to benchmark this checkout's
fastloss (built in place) before any installed one.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "fastloss").is_dir():
    sys.path.insert(0, str(ROOT))

from fastloss.benchmarks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
