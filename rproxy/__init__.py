"""rproxy: a reverse proxy served by gunicorn's gevent workers, configured by one INI file."""

__version__ = "0.1.0"
