"""The gateway's routers; :data:`ROUTERS` is the route table :func:`create_app` mounts, in order.

Add a module with a ``router`` (e.g. ``search.py`` for ``GET /v1/search``, ``entities.py`` for
``DELETE /v1/entities/{id}``) and list it here.
"""

from fastapi import APIRouter

from datamesh.gateway.routes import conversations, erasure, ops, search

ROUTERS: tuple[APIRouter, ...] = (ops.router, conversations.router, search.router, erasure.router)
