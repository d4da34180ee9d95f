"""What a failed connection to a ``rediss://`` (TLS) Redis means, in words that say what to change.

redis-py takes its TLS options from the URL's query (``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``), so the URL is the one setting for
the server and the workers alike. Its errors name OpenSSL's reason only; these name the fix.
Unlike an outage, such a problem does not go away by waiting.
"""

from __future__ import annotations

_MISMATCH = ("Hostname mismatch", "IP address mismatch", "doesn't match")


def tls_problem(exc: BaseException) -> str | None:
    """The fix for a TLS misconfiguration behind ``exc``; None when it is no such problem."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        if any(marker in text for marker in _MISMATCH):
            return (
                "the Redis server's TLS certificate does not name the host in redis.url: connect by a name "
                "or address the certificate lists"
            )
        return (
            "the Redis server's TLS certificate is not trusted: name the CA that signed it in redis.url, "
            "e.g. rediss://host:6380/0?ssl_ca_certs=/etc/ollm/redis-ca.pem"
        )
    if "handshake operation timed out" in text or "WRONG_VERSION_NUMBER" in text:
        return "no TLS server answered at that address: use redis:// for a Redis without TLS, or its TLS port"
    if "No such file or directory" in text:
        return "a file named in redis.url (ssl_ca_certs, ssl_certfile or ssl_keyfile) does not exist"
    return None


def explain(exc: BaseException) -> str:
    """``exc`` as text, followed by the fix when it is a TLS misconfiguration."""
    problem = tls_problem(exc)
    return f"{exc}; {problem}" if problem else str(exc)
