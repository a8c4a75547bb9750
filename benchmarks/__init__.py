"""Load tools for Flask-EventStream; see benchmarks/README.md."""
