"""Benchmark harness for imagingstudy-scp against DCMTK's storescp (run it with ``scripts/bench``).

Only the standard library and pydicom (for generating the data sets) are used; the server under test
is driven through its command line, never imported.
"""
