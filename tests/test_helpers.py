"""The test suite's own helpers (conftest.py) that guard against races between processes."""

import socket
import subprocess

import pytest
from conftest import retry_if_port_taken

TAKEN = "torch.distributed.DistNetworkError: ... port: 29517, useIpv6: 0, code: -98, name: EADDRINUSE, message: address already in use"


def _runs(*outcomes):
    """A run() that returns the given (returncode, stderr) outcomes in turn, and the list of calls."""
    calls = []

    def run():
        code, err = outcomes[len(calls)]
        calls.append(code)
        return subprocess.CompletedProcess([], code, stdout="", stderr=err)

    return run, calls


def test_a_run_whose_port_was_taken_is_run_again():
    run, calls = _runs((1, TAKEN), (0, ""))
    assert retry_if_port_taken(run).returncode == 0 and calls == [1, 0]
    run, calls = _runs((1, TAKEN), (1, TAKEN), (1, TAKEN))  # gives up after 3 attempts, with the last result
    assert retry_if_port_taken(run).returncode == 1 and len(calls) == 3


def test_other_failures_and_successes_are_not_run_again():
    run, calls = _runs((1, "Traceback ...\nValueError: something else"))
    assert retry_if_port_taken(run).returncode == 1 and calls == [1]
    run, calls = _runs((0, ""))
    assert retry_if_port_taken(run).returncode == 0 and calls == [0]


def test_a_bound_socket_that_does_not_listen_refuses_connections():
    """What test_zoo's no-network test relies on: the port stays ours, and connecting is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.socket() as other, pytest.raises(OSError):  # and no other socket can take it
            other.bind(("127.0.0.1", port))
