"""The benchmark suite behind ``fastloss bench`` and ``python -m bench``.

``fastloss.benchmarks.main`` is the entry point, built from these modules:

- ``timing``: quiet-machine wait, interleaved sampling, bandwidth floor.
- ``workload``: the workload record and the check against a float64
  reference.
- ``anchors``: the optional libraries that fastloss is compared with.
- ``regression``, ``classification``, ``overlap``: one module per loss
  family, building its workloads and their implementations.
- ``numba_kernels``: the numba anchor's kernels.
- ``suite``: the workloads of each run mode, and the run loop.
- ``report``: the JSON record, ``BENCHMARKS.md`` and the plot.
"""
