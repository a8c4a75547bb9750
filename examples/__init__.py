"""Small apps ported to Flask-EventStream from other SSE libraries.

Each one is a ``create_app()`` factory; ``docs/migrating.rst`` shows what it
looked like before the port.
"""
