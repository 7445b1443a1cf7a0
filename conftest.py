# pytest runs the docstring examples of every module under fastloss/.
# The numba anchor of the benchmark suite imports numba at module level and
# is only ever imported where numba is installed, so it is collected only
# there too.
import importlib.util

collect_ignore = []
if importlib.util.find_spec("numba") is None:
    collect_ignore.append("fastloss/_bench/numba_kernels.py")
