"""TLS settings of an endpoint (hosts.toml `ca`, `client`, `skip_verify`) as an SSLContext."""

from __future__ import annotations

import functools
import ssl

import certifi

from snapshotter.registry.errors import HostsConfigInvalid
from snapshotter.registry.hosts import Endpoint

__all__ = ["ssl_context"]


def ssl_context(ep: Endpoint | None) -> ssl.SSLContext:
    """System roots plus the endpoint's extra CAs; no verification with skip_verify.

    Endpoints without TLS settings of their own share one context: parsing the CA bundle
    takes ~25 ms, which the daemon pays at start (`ssl_context(None)`) rather than in the
    first lazy Prepare.
    """
    if ep is None or not (ep.ca or ep.client_certs or ep.skip_verify):
        return _roots()
    ctx = ssl.create_default_context(cafile=certifi.where())
    try:
        for ca in ep.ca:
            ctx.load_verify_locations(cafile=str(ca))
        for cert, key in ep.client_certs:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise HostsConfigInvalid(
            f"registry {ep.describe()}: cannot load CA or client certificate: {exc}"
        ) from exc
    if ep.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@functools.cache
def _roots() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())
