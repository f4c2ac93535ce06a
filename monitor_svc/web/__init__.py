"""The web view (SPEC §7): pages, a JSON API and one Server-Sent Events stream per page,
served by aiohttp from the monitor's own event loop.

Everything here reads and writes through the monitor's public RPCs (a ``MonitorClient`` on a
private loopback socket), never through the store: the same code could run as a process of
its own. Where each part lives (each imports only those after it):

- ``server``: the aiohttp application, its routes and its lifetime beside gRPC.
- ``auth``: the bearer token, the login form and the cookie it sets.
- ``api``: the JSON routes (``/api/v1/...``), errors mapped to HTTP statuses in one place.
- ``job_events``: one page's event stream: ``state``, ``log`` and ``end``, resumable by id.
- ``feeds``: one WatchJob per watched job and one job-list query per filter, shared by
  every page that shows them.
- ``wire``: protobuf JSON, SSE frames and event ids (pure).
"""
