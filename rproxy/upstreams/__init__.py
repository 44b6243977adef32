"""Upstream servers: their pools, which one gets a request, their health."""
