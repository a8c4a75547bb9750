"""The servers Flask-EventStream is measured against, one module each.

Each answers the interface of benchmarks/README.md; ``benchmarks.servers``
knows how to start them.
"""
