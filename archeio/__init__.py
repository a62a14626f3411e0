"""archeio: the redirect server behind registry.k8s.io, in Python.

Layout: `config` (settings), `routing` (the pure decision), `clientip`
(X-Forwarded-For trust), `existence` (HEAD checks and their caches), `app`
(the request flow), `protocol` (the public port's HTTP), `server` (sockets,
signals, shutdown), `cli` (the command line).
"""

__version__ = "0.1.0"
