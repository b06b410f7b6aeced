"""Reliability and security suite (issue #8): bad input, no foreign code, faults, fuzzing, determinism.

docs/reliability.md lists every case with the test that checks it.
"""
