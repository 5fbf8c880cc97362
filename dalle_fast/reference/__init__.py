"""Pure-PyTorch references of every op: the truth in tests, benchmarks and the selftest.

Each op's reference lives in its own module here; they are written for clarity, not speed,
and run in any dtype (tests run them in float64).
"""
