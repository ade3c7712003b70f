"""The operator console: an HTTP edge (REST API, Orthanc-compatible worklist endpoints,
server-rendered pages, /health and /metrics) served by ``worklist-broker serve``.

It imports the core; the core never imports it. ``broker.app`` builds it with
:func:`broker.web.app.create_app` and runs it with :class:`broker.web.server.WebServer`.
"""
