"""ACME Renewal Information (RFC 9773): when the CA would like a certificate renewed.

A CA whose directory names a `renewalInfo` URL answers, for each certificate
it issued, a suggested renewal window (and a Retry-After saying when to ask
again). The pure rules live here: the certificate's identifier in that URL,
reading the answer, and the moment chosen inside the window; acme.py asks
and schedules. The window moves when the CA wants a certificate replaced
early (a revocation coming, say), which a fixed "30 days before expiry" rule
cannot hear.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import random
from dataclasses import dataclass
from typing import Callable

from cryptography import x509

# RFC 9773 §4.3: without a usable Retry-After, ask again in six hours; a CA's
# Retry-After is kept within a minute and a day, so that neither a typo at
# the CA nor a hostile answer makes rproxy hammer it or stop listening.
DEFAULT_RETRY = 6 * 3600.0
MIN_RETRY = 60.0
MAX_RETRY = 24 * 3600.0


class RenewalInfoError(ValueError):
    """The CA's renewal information is unusable (the fixed rule applies instead)."""


@dataclass(frozen=True)
class Window:
    """A suggested renewal window, as POSIX timestamps."""
    start: float
    end: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def certificate_id(cert: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(serial as
    the bytes of its DER INTEGER), both without padding."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise RenewalInfoError("the certificate has no Authority Key Identifier") from None
    if aki.key_identifier is None:
        raise RenewalInfoError("the certificate's Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    # A DER INTEGER is two's complement, big-endian, minimal: one more bit for the sign.
    serial_bytes = serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)
    return f"{_b64(aki.key_identifier)}.{_b64(serial_bytes)}"


def _timestamp(value, field: str) -> float:
    if not isinstance(value, str):
        raise RenewalInfoError(f"suggestedWindow.{field} is not a date-time string")
    try:
        # RFC 3339 (its "t" and "z" may be lower case); fromisoformat takes "Z"
        # and fractions finer than microseconds from Python 3.11 on.
        when = datetime.datetime.fromisoformat(value.upper())
    except ValueError:
        raise RenewalInfoError(f"suggestedWindow.{field} {value!r} is not an RFC 3339 date-time") from None
    if when.tzinfo is None:
        raise RenewalInfoError(f"suggestedWindow.{field} {value!r} has no time zone")
    return when.timestamp()


def parse_window(body) -> Window:
    """The suggested window of a renewalInfo answer (JSON, already decoded)."""
    window = body.get("suggestedWindow") if isinstance(body, dict) else None
    if not isinstance(window, dict):
        raise RenewalInfoError("the answer has no suggestedWindow object")
    start, end = _timestamp(window.get("start"), "start"), _timestamp(window.get("end"), "end")
    # RFC 9773 §4.2: a window that ends before it starts is invalid.
    if end < start:
        raise RenewalInfoError("suggestedWindow ends before it starts")
    return Window(start, end)


def choose(window: Window, uniform: Callable[[float, float], float] = random.uniform) -> float:
    """RFC 9773 §4.2: a uniformly random moment inside the window, so that a
    CA's many clients do not all come back at once. A moment already past
    means: renew now."""
    return uniform(window.start, window.end)


def retry_after(header: str | None, now: float) -> float:
    """When to ask again (timestamp), from a Retry-After header: seconds or an HTTP-date."""
    wait = DEFAULT_RETRY
    if header:
        text = header.strip()
        if text.isdigit():
            wait = float(text)
        else:
            try:
                wait = email.utils.parsedate_to_datetime(text).timestamp() - now
            except (TypeError, ValueError):
                pass
    return now + min(max(wait, MIN_RETRY), MAX_RETRY)


def _get(url: str, verify, timeout: float):
    import requests
    response = requests.get(url, verify=verify, timeout=timeout, headers={"User-Agent": "rproxy"})
    if response.status_code != 200:
        raise RenewalInfoError(f"GET {url} answered {response.status_code}")
    try:
        return response, response.json()
    except ValueError:
        raise RenewalInfoError(f"GET {url} answered no JSON") from None


def renewal_info_url(directory: str, verify, timeout: float = 10.0) -> str:
    """The directory's renewalInfo URL; empty when the CA offers none."""
    _, body = _get(directory, verify, timeout)
    url = body.get("renewalInfo") if isinstance(body, dict) else None
    return url.rstrip("/") if isinstance(url, str) else ""


def fetch(url: str, cert: x509.Certificate, verify, now: float, timeout: float = 10.0) -> tuple[Window, float]:
    """Ask the CA about `cert`: (its suggested window, when to ask again)."""
    response, body = _get(f"{url}/{certificate_id(cert)}", verify, timeout)
    return parse_window(body), retry_after(response.headers.get("Retry-After"), now)
