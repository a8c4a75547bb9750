"""``eventstream.js``, the browser module that the blueprint serves.

The URL that ``url_for`` builds names the module's version, so a browser
may keep it for long; any other URL is checked again, cheaply, by its ETag.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import typing as t

from flask import request
from flask import Response

#: How long a browser keeps ``eventstream.js`` fetched from the URL that
#: ``url_for`` gives, which names its version.
SCRIPT_MAX_AGE_SECONDS = 365 * 86400


@functools.cache
def _script_file() -> tuple[bytes, str]:
    body = (
        importlib.resources.files(__package__) / "static/eventstream.js"
    ).read_bytes()
    return body, hashlib.sha256(body).hexdigest()[:16]


def serve_script() -> Response:
    """The view of ``<prefix>/eventstream.js``."""
    body, version = _script_file()
    # The URL that url_for gives names the version, so it may be kept for
    # long; any other is checked again each time, cheaply, by its ETag.
    cache = (
        f"public, max-age={SCRIPT_MAX_AGE_SECONDS}, immutable"
        if request.args.get("v") == version
        else "no-cache"
    )
    response = Response(body, mimetype="text/javascript")
    response.headers["Cache-Control"] = cache
    response.set_etag(version)
    # In place: 304 with no body when the browser has this version.
    response.make_conditional(request)
    return response


def add_script_version(endpoint: str, values: dict[str, t.Any]) -> None:
    """Name the module's version in the URLs that ``url_for`` builds."""
    if endpoint.rpartition(".")[2] == "script":
        values.setdefault("v", _script_file()[1])
