"""Test and demo laboratory: throwaway database servers, memory cgroups and hogs.

Not part of the installed package: used by tests/, benchmarks/ and `make demo`.
"""
