"""iterflow benchmarks: the same workloads on the Rust and the pure-Python core.

Run ``python -m benches --help`` (or see docs/benchmarks.md). ``benches/micro`` holds
pytest-benchmark micro benchmarks of the hot pure-Python pieces (``pytest benches/micro``).
"""
