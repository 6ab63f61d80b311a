"""Speed and memory benchmarks of pyro_ladder against a plain-PyTorch reference.

Not part of the installed package or the test run; ``python -m benchmarks --help``.
"""
