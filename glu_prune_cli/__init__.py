"""The ``glu-prune`` command line: parses arguments, builds the library's configs, calls its API.

It sits on top of calibrate, pruning and benchmarks, and nothing imports it.
"""
