"""HTTP requests to endpoints: loopback addresses never go through a proxy, and a URL is checked before use."""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(url: str) -> bool:
    """True when ``url`` names this machine (127.0.0.0/8, ::1, localhost)."""
    host = (urlsplit(url).hostname or "").lower()
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_url(url: str) -> str:
    """``url`` once it is an http(s) URL with a host and a port in 1-65535; ValueError (one line) saying what is
    wrong otherwise. (urllib would take port 99999 as 34463, and fail on others with a traceback.)"""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:  # "Port out of range", "Invalid IPv6 URL", a port that is not a number
        raise ValueError(f"{url!r} is not a usable URL: {error}; write it as http://HOST:PORT") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host; write it as http://HOST:PORT")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 cannot be connected to; use a port from 1 to 65535")
    return url


def urlopen(request: urllib.request.Request | str, timeout: float) -> Any:
    """``urllib.request.urlopen``, except that a loopback address is reached directly, never through the proxy
    that HTTP_PROXY names (a proxy elsewhere cannot reach this machine's 127.0.0.1)."""
    url = request.full_url if isinstance(request, urllib.request.Request) else request
    if is_loopback(url):
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URLs, checked by the callers


def status_of(url: str, timeout: float = 2.0) -> int:
    """The HTTP status a GET of ``url`` answers (a local URL: never through a proxy); 0 when nothing answers."""
    try:
        with urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0
