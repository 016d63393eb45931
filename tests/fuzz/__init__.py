"""Fuzzing every RPC with messages generated from the protos' descriptors (hypothesis).

Shared by ``tests/integration/test_fuzz_rpcs.py`` (bounded, in CI) and ``benchmarks/fuzz.py``
(10,000 cases); test-only code, never imported by servers.
"""
