"""gunicorn and gevent, from inside: the only code that touches their internals."""
