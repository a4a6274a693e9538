"""Benchmarks behind `ssl-dist bench ...`: each prints a table and writes JSON."""
