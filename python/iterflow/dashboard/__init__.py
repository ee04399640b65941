"""A web dashboard for iterflow: runs, flows, crons and workers, with cancel, retry and signals.

Needs the ``dashboard`` extra (``pip install "iterflow[dashboard]"``: Starlette and Jinja2).
``create_app`` gives an ASGI app to serve on its own (``iterflow dashboard``) or to mount in a
host application; docs/operations.md, "Dashboard".
"""

from .app import create_app

__all__ = ["create_app"]
