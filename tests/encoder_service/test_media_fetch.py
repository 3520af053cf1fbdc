"""Media sources: http(s) fetching with the SSRF rules, data: URLs and confined file:// reads."""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
from pathlib import Path

import pytest

from encoder_service.config import MediaLimits
from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.items import MediaItem, Modality
from encoder_service.media.addresses import is_blocked
from encoder_service.media.fetch import load_media_bytes

STRICT = MediaLimits(media_fetch_timeout_s=2.0, max_media_bytes=1 << 20)
LOOPBACK_OK = dataclasses.replace(STRICT, allow_private_media_urls=True)


def load(url: str, limits: MediaLimits = STRICT) -> bytes:
    return load_media_bytes(MediaItem(0, Modality.IMAGE, url=url), limits)


def refused(url: str, limits: MediaLimits = STRICT, kind: ErrorKind = ErrorKind.INVALID) -> str:
    with pytest.raises(EncodeError) as info:
        load(url, limits)
    assert info.value.kind is kind, info.value.message
    return info.value.message


def test_fetches_from_loopback_only_when_allowed(media_http):
    media_http.routes["/a.png"] = b"image-bytes"
    assert load(media_http.url("/a.png"), LOOPBACK_OK) == b"image-bytes"
    assert "non-public" in refused(media_http.url("/a.png"))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/x.png",  # CGNAT
        "http://192.168.1.1/x.png",
        "http://172.16.0.1/x.png",
        "http://[::1]/x.png",
        "http://[fe80::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[::ffff:8.8.8.8]/x.png",  # IPv4-mapped is always refused
        "http://2130706433/x.png",  # decimal form of 127.0.0.1
        "http://0x7f.1/x.png",  # hex/short form of 127.0.0.1
        "http://0.0.0.0/x.png",
        "http://localhost/x.png",
    ],
)
def test_private_addresses_refused_before_connecting(url, monkeypatch):
    def no_connect(*args, **kwargs):
        raise AssertionError("a refused address must not be connected to")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    assert "non-public" in refused(url)


def test_public_addresses_pass_the_policy():
    import ipaddress

    for text in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert not is_blocked(ipaddress.ip_address(text)), text
    for text in ("2002:7f00:1::", "64:ff9b::a00:1"):  # 6to4 / NAT64 wrapping 127.0.0.1 / 10.0.0.1
        assert is_blocked(ipaddress.ip_address(text)), text


@pytest.mark.parametrize(
    "url, needle",
    [
        ("ftp://example.com/x.png", "http(s), data or file"),
        ("gopher://example.com/x", "http(s), data or file"),
        ("javascript:alert(1)", "http(s), data or file"),
        ("http://127.0.0.1\\@example.com/x.png", "backslash"),
        ("http://user:pw@example.com/x.png", "userinfo"),
        ("http://example.com/a b.png", "whitespace"),
        ("http://example.com/\x00.png", "control"),
        ("http://exa\u00efmple.com/x.png", "non-ASCII"),
        ("http:///x.png", "no host"),
    ],
)
def test_malformed_urls_refused(url, needle):
    assert needle in refused(url, LOOPBACK_OK)


def test_redirects_are_followed_and_each_hop_is_checked(media_http):
    media_http.routes["/b.png"] = b"after-redirect"
    assert load(media_http.url("/redirect?/b.png"), LOOPBACK_OK) == b"after-redirect"
    # the first hop's host is allowed, the redirect target's is not
    only_ip = dataclasses.replace(LOOPBACK_OK, allowed_media_domains=("127.0.0.1",))
    target = media_http.url("/b.png", host="localhost")
    assert "allowed media domains" in refused(media_http.url(f"/redirect?{target}"), only_ip)
    # a redirect cannot switch to a local file
    assert "http(s)" in refused(media_http.url("/redirect?file:///etc/passwd"), LOOPBACK_OK)
    assert "too many redirects" in refused(media_http.url("/loop"), LOOPBACK_OK)


def test_download_is_capped_whatever_content_length_says(media_http):
    assert "1048576-byte limit" in refused(media_http.url("/huge-undeclared"), LOOPBACK_OK)
    assert "1048576-byte limit" in refused(media_http.url("/huge-declared"), LOOPBACK_OK)


def test_slow_server_times_out(media_http):
    fast = dataclasses.replace(LOOPBACK_OK, media_fetch_timeout_s=0.3)
    assert "timed out" in refused(media_http.url("/slow"), fast, ErrorKind.TIMEOUT)


def test_http_errors_and_unreachable_hosts(media_http):
    assert "HTTP 404" in refused(media_http.url("/missing.png"), LOOPBACK_OK)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "could not be fetched" in refused(f"http://127.0.0.1:{port}/x.png", LOOPBACK_OK)
    assert "cannot resolve" in refused("http://no-such-host.invalid/x.png")


def test_data_urls():
    payload = b"\x89PNG-not-really"
    assert load("data:image/png;base64," + base64.b64encode(payload).decode()) == payload
    assert "base64" in refused("data:image/png," + "abc")
    assert "not valid base64" in refused("data:image/png;base64,@@@@")
    big = base64.b64encode(b"\0" * (STRICT.max_media_bytes + 10)).decode()
    assert "byte limit" in refused("data:image/png;base64," + big)


def test_raw_bytes_are_size_checked():
    with pytest.raises(EncodeError, match="byte limit"):
        load_media_bytes(MediaItem(0, Modality.IMAGE, data=b"\0" * (2 << 20)), STRICT)
    with pytest.raises(EncodeError, match="empty"):
        load_media_bytes(MediaItem(0, Modality.IMAGE, data=b""), STRICT)


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "ok.png").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.txt", allowed / "escape.png")
    os.symlink(tmp_path, allowed / "updir")
    os.symlink(allowed / "sub" / "ok.png", allowed / "inner-link.png")
    return allowed


def test_local_files_confined_to_allowed_dir(media_dir: Path):
    limits = dataclasses.replace(STRICT, allowed_local_media_path=str(media_dir))
    root = media_dir.as_posix()
    assert load(f"file://{root}/sub/ok.png", limits) == b"inside"
    assert load(f"file://localhost{root}/sub/ok.png", limits) == b"inside"
    assert load(f"file://{root}/inner-link.png", limits) == b"inside"  # stays inside: fine
    assert "'..'" in refused(f"file://{root}/../secret.txt", limits)
    assert "'..'" in refused(f"file://{root}/sub/%2e%2e/%2E%2E/secret.txt", limits)
    assert "outside" in refused(f"file://{root}/escape.png", limits)
    assert "outside" in refused(f"file://{root}/updir/secret.txt", limits)
    assert "outside" in refused("file:///etc/passwd", limits)
    assert "host" in refused(f"file://evil.example{root}/sub/ok.png", limits)
    assert "does not exist" in refused(f"file://{root}/sub/nope.png", limits)
    assert "regular file" in refused(f"file://{root}/sub", limits)
    assert "disabled" in refused(f"file://{root}/sub/ok.png", STRICT)
