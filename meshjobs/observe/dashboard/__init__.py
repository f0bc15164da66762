"""The live dashboard: ``meshjobs dashboard`` (an ASGI app, static files, server-sent events).

:mod:`.view` keeps the picture of the mesh current from NATS, :mod:`.health`
reads the servers' monitoring endpoints, :mod:`.evidence` turns evidence and
durable job states into rows, :mod:`.access` guards every request and
:mod:`.app` serves the page and its API. Needs the ``observe`` extra
(starlette, uvicorn).
"""
