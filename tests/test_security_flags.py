"""The service-security flags: read once, checked at start, passed on as given by `up`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError
from protos.security import add_security_arguments, security_argv, security_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_security_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_flags_mean_plain_links() -> None:
    security = security_from_args(parse())
    assert security.token is None and not security.tls
    assert security.server_credentials() is None and security.channel_credentials() is None
    assert security.server_interceptors() == [] and security.client_interceptors() == []


def test_the_token_is_the_files_first_line(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc123\n")
    security = security_from_args(parse("--grpc-token-file", str(tmp_path / "token")))
    assert security.token == "abc123"
    assert len(security.client_interceptors()) == 3


@pytest.mark.parametrize("content", ["", "\n", "two\nlines\n"])
def test_an_empty_or_multi_line_token_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "token").write_text(content)
    with pytest.raises(InvalidRequestError, match="one non-empty line"):
        security_from_args(parse("--grpc-token-file", str(tmp_path / "token")))


def test_tls_flags_must_come_together(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not checked here")
    with pytest.raises(InvalidRequestError, match="together"):
        security_from_args(parse("--tls-cert", str(pem)))
    with pytest.raises(InvalidRequestError, match="needs --tls-cert"):
        security_from_args(parse("--tls-ca", str(pem)))
    with pytest.raises(InvalidRequestError, match="cannot read --tls-key"):
        security_from_args(parse("--tls-cert", str(pem), "--tls-key", str(tmp_path / "no")))


def test_pdserve_up_passes_the_flags_on_as_given() -> None:
    args = parse("--grpc-token-file", "/t", "--tls-cert", "/c", "--tls-key", "/k",
                 "--tls-ca", "/a")
    assert security_argv(args) == ["--grpc-token-file", "/t", "--tls-cert", "/c",
                                   "--tls-key", "/k", "--tls-ca", "/a"]
    assert security_argv(parse()) == []
