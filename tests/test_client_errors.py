"""aiohttp's exceptions -> causes (gateway.protocols.client_errors): every exception
class aiohttp defines is decided here, by name, so a new one fails until it is."""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path
from typing import get_args

import aiohttp
import pytest
from aiohttp import client_exceptions
from aiohttp.client_reqrep import ConnectionKey

from gateway.causes import RETRY_ON_WORDS, Cause, Stage
from gateway.protocols.client_errors import CAUSES, cause_of, upstream_error
from gateway.registry import RetryOn

# What each of aiohttp's client exceptions means for a try, before the answer began.
EXPECTED: dict[type[BaseException], Cause] = {
    aiohttp.ClientError: Cause.RESET,
    aiohttp.ClientConnectionError: Cause.RESET,
    aiohttp.ClientConnectionResetError: Cause.RESET,
    aiohttp.ClientOSError: Cause.RESET,
    aiohttp.ServerConnectionError: Cause.RESET,
    aiohttp.ServerDisconnectedError: Cause.RESET,
    aiohttp.UploadAbortedError: Cause.RESET,
    aiohttp.ClientConnectorError: Cause.CONNECT,
    aiohttp.ClientProxyConnectionError: Cause.CONNECT,
    client_exceptions.UnixClientConnectorError: Cause.CONNECT,
    aiohttp.InvalidURL: Cause.CONNECT,
    aiohttp.InvalidUrlClientError: Cause.CONNECT,
    aiohttp.InvalidUrlRedirectClientError: Cause.CONNECT,
    aiohttp.NonHttpUrlClientError: Cause.CONNECT,
    aiohttp.NonHttpUrlRedirectClientError: Cause.CONNECT,
    aiohttp.RedirectClientError: Cause.CONNECT,
    aiohttp.ClientConnectorDNSError: Cause.DNS,
    aiohttp.ClientSSLError: Cause.TLS,
    aiohttp.ClientConnectorSSLError: Cause.TLS,
    aiohttp.ClientConnectorCertificateError: Cause.TLS,
    aiohttp.ServerFingerprintMismatch: Cause.TLS,
    aiohttp.ConnectionTimeoutError: Cause.CONNECT_TIMEOUT,
    aiohttp.ServerTimeoutError: Cause.TIMEOUT,
    aiohttp.SocketTimeoutError: Cause.TIMEOUT,
    TimeoutError: Cause.TIMEOUT,
    aiohttp.ClientResponseError: Cause.BAD_ANSWER,
    aiohttp.ContentTypeError: Cause.BAD_ANSWER,
    aiohttp.ClientHttpProxyError: Cause.BAD_ANSWER,
    aiohttp.TooManyRedirects: Cause.BAD_ANSWER,
    aiohttp.WSServerHandshakeError: Cause.BAD_ANSWER,
    aiohttp.ClientPayloadError: Cause.TRUNCATED,
}


def aiohttp_exceptions() -> set[type[BaseException]]:
    """Every exception class aiohttp exports for its client (ClientError and below)."""
    found: set[type[BaseException]] = set()
    stack: list[type[BaseException]] = [aiohttp.ClientError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("aiohttp") and cls not in found:
            found.add(cls)
            stack.extend(cls.__subclasses__())
    return found


def test_every_aiohttp_client_exception_is_decided() -> None:
    undecided = sorted(c.__name__ for c in aiohttp_exceptions() - set(EXPECTED))
    assert not undecided, f"aiohttp exceptions with no decided cause: {undecided}"


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_each_exception_class_maps_to_its_cause(cls: type[BaseException]) -> None:
    exc = cls.__new__(cls)  # the cause is the class's: no need for real arguments
    assert cause_of(exc, answered=False) is EXPECTED[cls]


def test_a_connection_lost_once_the_answer_began_is_truncated() -> None:
    exc = aiohttp.ServerDisconnectedError()
    assert cause_of(exc, answered=False) is Cause.RESET
    assert cause_of(exc, answered=True) is Cause.TRUNCATED
    assert cause_of(aiohttp.ClientPayloadError("cut"), answered=False) is Cause.TRUNCATED


def test_not_a_client_failure_is_no_cause() -> None:
    assert cause_of(KeyError("a bug"), answered=False) is None
    assert all(issubclass(cls, BaseException) for cls in CAUSES)


def key() -> ConnectionKey:
    return ConnectionKey("sdxl-0.internal", 443, True, True, None, None, None)


def test_a_dns_failure_is_not_reported_as_connection_refused() -> None:
    gaierror = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    exc = aiohttp.ClientConnectorDNSError(key(), gaierror)
    error = upstream_error(exc, worker="sdxl-0", answered=False, timeout_s=5)
    assert error.detail == "worker sdxl-0: its host name did not resolve"
    assert (error.cause, error.status_code) == (Cause.DNS, 502)


def test_a_certificate_failure_is_tls() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc = aiohttp.ClientConnectorCertificateError(key(), verify)
    error = upstream_error(exc, worker="sdxl-0", answered=False, timeout_s=5)
    assert error.detail == "worker sdxl-0: the TLS handshake failed"
    assert "sdxl-0.internal" not in error.detail  # a worker's address never reaches a client


def test_a_refused_connection_says_so_in_the_systems_words() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    exc = aiohttp.ClientConnectorError(key(), refused)
    error = upstream_error(exc, worker="sdxl-0", answered=False, timeout_s=5)
    assert error.detail == "worker sdxl-0: cannot connect (connection refused)"


def test_a_timeout_names_the_time_the_try_had() -> None:
    error = upstream_error(TimeoutError(), worker="sdxl-0", answered=True, timeout_s=2.25)
    assert error.detail == "worker sdxl-0: no answer within 2.2s"
    assert error.status_code == 504


# -- the vocabulary itself ----------------------------------------------------------------


def test_labels_are_unique() -> None:
    labels = [cause.label for cause in Cause]
    assert len(labels) == len(set(labels))


def test_the_registrys_retry_on_words_are_the_causes() -> None:
    assert set(get_args(RetryOn)) == RETRY_ON_WORDS


def test_only_a_job_the_worker_may_have_run_needs_retry_on() -> None:
    for cause in Cause:
        assert (cause.retry_on is not None) == (cause.stage is Stage.ACCEPTED), cause


def test_the_readme_lists_every_cause() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [cause.label for cause in Cause if f"| `{cause.label}` |" not in readme]
    assert not missing, f"README's 'Why a try fails' table lacks {missing}"
