"""Benchmark cases, one module per suite: CASES (what runs) and TABLES (what bench/README.md shows)."""
