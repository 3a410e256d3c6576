"""HTTP sessions to the ITSM, with the environment read once, when a session is made.

requests reads the environment on every call by default (``Session.trust_env``), and
that hurts in three ways here:

- an explicit ``Session.verify`` loses to ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``:
  a configured private CA is ignored and ``verify_tls = false`` is not applied
  (psf/requests#3829, open since 2017);
- a ``~/.netrc`` entry for the ITSM host replaces the bearer token with Basic auth;
- walking the environment for proxies twice per call costs about a fifth of the
  client's CPU per create.

So every session is made with ``trust_env`` off, the proxies for the ITSM's URL are
read from the environment here (``NO_PROXY`` honoured), and the CA bundle variables
are used only when nothing was configured.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies


def tls_verify(settings: Any) -> bool | str:
    """What the settings ask for: the private CA's bundle, else verify or not."""
    return settings.itsm_ca_bundle or settings.itsm_verify_tls


def new_session(url: str, verify: bool | str, pool_size: int = 1) -> requests.Session:
    """A Session for the ITSM at ``url``: no urllib3 retries (the caller's policy decides)."""
    if verify is True:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return _session(get_environ_proxies(url), verify, pool_size)


def fresh_copy(session: requests.Session) -> requests.Session:
    """The same settings on new connections (a forked process must not share sockets)."""
    adapter = session.get_adapter("https://")
    pool_size = getattr(adapter, "_pool_maxsize", 1)
    verify = True if session.verify is None else session.verify
    return _session(dict(session.proxies), verify, pool_size)


def _session(proxies: dict[str, str], verify: bool | str, pool_size: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies = proxies
    session.verify = verify
    return session
