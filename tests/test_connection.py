"""Redis URLs: which forms are taken, what each refusal says, and that no refusal or log line holds any
part of a password, however malformed the URL (issue 17, finding 3). Connections to real servers (TLS,
ACL users, Sentinel) are in test_redis_deployments.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resque_starter.config import ConfigError
from resque_starter.connection import BadURL, check_url, connect, mask_url
from resque_starter.loader import load

from starter import ROOT, base_env

ALLOWED = "a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"


def refusal(url: str) -> str:
    with pytest.raises(BadURL) as caught:
        check_url(url)
    message = str(caught.value)
    assert message.startswith(ALLOWED), message
    return message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://",
        "rediss://user:p%40ss@redis.example:6380/2?ssl_cert_reqs=none",
        "rediss://h?ssl_ca_certs={ca}&ssl_certfile={ca}&ssl_keyfile={ca}&ssl_check_hostname=false",
        "rediss://h?ssl_ca_path={dir}&ssl_password=x&ssl_ciphers=HIGH",
        "redis://h/0?username=worker&password=pw&client_name=w1&socket_timeout=2.5&socket_keepalive=yes",
        "redis://[::1]:6379/1?health_check_interval=30&socket_connect_timeout=1",
        "unix:///run/redis.sock?db=1",
        "unix://:pw@/run/redis.sock",
        "unix:///run/a@b.sock",
        "redis+sentinel://s1:26379,s2,[::1]:26380/mymaster",
        "redis+sentinel://worker:pw@s1/mymaster/3?sentinel_password=sp&sentinel_username=su&db=3",
        "rediss+sentinel://s1/mymaster?ssl_ca_certs={ca}",
        "redis://h/0?client_name=me@home",
    ],
)
def test_urls_redis_py_takes(url: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    url = url.format(ca=ca, dir=tmp_path)
    assert check_url(f"  {url} ") == url
    # and redis-py takes every option: a connection object is built (not connected) without a TypeError
    client = connect(url)
    client.connection_pool.make_connection().disconnect()
    client.close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", ""),
        ("http://127.0.0.1", "the scheme is 'http'"),
        ("127.0.0.1:6379", ""),
        ("REDIS://h", "write redis:// in lowercase, with both slashes"),
        ("redis:/h", "write redis:// in lowercase, with both slashes"),
        ("redis://h:0", "a port is a number from 1 to 65535"),
        ("redis://h:65536", "a port is a number from 1 to 65535"),
        ("redis://[::1/0", "the host is neither a name nor an [IPv6] address"),
        ("redis://h/x", "the database 'x' is not a number"),
        ("redis://h/0#x", "a # starts a fragment"),
        ("unix://", "unix:// takes the socket's path"),
        ("unix://host/run/redis.sock", "unix:// takes the socket's path"),
        ("redis://h?db=x", "db='x': a database number"),
        ("redis://h?db=1&db=2", "db is given twice"),
        ("redis://h?socket_timeout=0", "socket_timeout='0': seconds > 0"),
        ("redis://h?socket_keepalive=off", "socket_keepalive='off': true or false"),
        ("redis://h?ssl_cert_reqs=none", "ssl_cert_reqs needs rediss:// or rediss+sentinel://"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe': none, optional or required"),
        ("rediss://h?ssl_ca_certs=/no/such.pem", "ssl_ca_certs='/no/such.pem': a readable PEM file"),
        ("redis://h?sentinel_password=x", "sentinel_password needs redis+sentinel://"),
        ("redis://h?ssl_ca_cert=x", "unknown option 'ssl_ca_cert'; redis:// takes db, username, password"),
        ("redis+sentinel://s1:26379", "the path of a Sentinel URL is /SERVICE or /SERVICE/DB"),
        ("redis+sentinel://s1/svc/x", "the path of a Sentinel URL is /SERVICE or /SERVICE/DB"),
        ("redis+sentinel://s1,,s2/svc", "name the Sentinels"),
        ("redis+sentinel:///svc", "name the Sentinels"),
        ("redis+sentinel://s1:99999/svc", "a port is a number from 1 to 65535"),
    ],
)
def test_urls_refused_with_the_reason(url: str, why: str) -> None:
    assert why in refusal(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        # the examples of issue 17: urlsplit's port error echoed Xy9Kp2; the rest printed whole or in part
        ("redis://:Xy9Kp2/QzW8@host", "must write / ? # as %2F %3F %23"),
        ("redis:/:Xy9Kp2@host/0", "write redis://"),
        ("redis://h/0?password=Xy9#Kp2", "a password option must write # & + as %23 %26 %2B"),
        ("redis://h/0?password=Xy9&Kp2", "a password option must write # & + as %23 %26 %2B"),
        ("redis://h/0?password=Xy9+Kp2", "a password option must write # & + as %23 %26 %2B"),
        ("redis://user:Xy9Kp2", "a port is a number"),  # @host left out: the password looks like a port
        ("redis://:Xy9Kp2@h:port/0", "a port is a number"),
    ],
)
def test_a_malformed_url_is_refused_without_its_password(url: str, why: str) -> None:
    message = refusal(url)
    assert why in message
    with pytest.raises(ConfigError) as caught:
        load({}, {"REDIS_URL": url})
    assert "Xy9" not in str(caught.value) and "Kp2" not in str(caught.value), caught.value
    assert "REDIS_URL=" in str(caught.value) and "***" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:secret@h", "rediss://user:***@h"),
        ("redis://user:se:cr@et@h/1", "redis://user:***@h/1"),
        ("unix://:secret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("redis://h/0?password=secret&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h/0?password=sec#ret&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h/0?password=sec&ret", "redis://h/0?password=***"),
        ("redis://:p/w@h/0", "redis://:***@h/0"),
        (
            "redis+sentinel://u:p@s1,s2/m?sentinel_password=sp",
            "redis+sentinel://u:***@s1,s2/m?sentinel_password=***",
        ),
        ("rediss://h?ssl_password=kp&ssl_certfile=/c.pem", "rediss://h?ssl_password=***&ssl_certfile=/c.pem"),
        ("redis://user@h", "redis://user@h"),
        ("redis://h:6379", "redis://h:6379"),
        ("unix:///run/a@b.sock", "unix:///run/a@b.sock"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_strict_masking_hides_the_user_name_too() -> None:
    """A user name may be a password whose colon was left out (`redis:secret@host`)."""
    assert mask_url("redis:secret@host") == "redis:secret@host"
    assert mask_url("redis:secret@host", strict=True) == "redis:***@host"
    assert mask_url("rediss://user:pw@h/0?password=x", strict=True) == "rediss://***@h/0?password=***"


# ---- generated malformed URLs: no part of the password in any error line

RUN = "JKVWXZ"  # letters no message of ours holds three of in a row
SPECIAL = "/?#@:&+%=[] "
secrets = st.lists(
    st.tuples(st.text(RUN, min_size=3, max_size=6), st.text(SPECIAL, max_size=2)), min_size=1, max_size=4
).map(lambda pieces: "".join(run + special for run, special in pieces))


@st.composite
def urls_with_a_password(draw: st.DrawFn) -> tuple[str, str]:
    secret = draw(secrets)
    scheme = draw(st.sampled_from(["redis", "rediss", "unix", "redis+sentinel", "http", "REDIS", ""]))
    separator = draw(st.sampled_from(["://", ":/", ":", "//", ":///", ""]))
    host = draw(st.sampled_from(["127.0.0.1:6379", "h:notaport", "[::1", "", "s1:26379,s2", "h:0"]))
    path = draw(st.sampled_from(["", "/0", "/x", "/mymaster/0", "/run/redis.sock"]))
    query = draw(st.sampled_from(["", "?db=zz", "?foo=1", "?ssl_cert_reqs=none", "?db=1&db=2", "#frag"]))
    option = draw(st.sampled_from(["password", "sentinel_password", "ssl_password"]))
    after = draw(st.sampled_from(["", "&db=1", "&db=zz", "#frag", "&foo"]))
    user = draw(st.sampled_from(["", "worker"]))
    shape = draw(st.sampled_from(["userinfo", "option", "no host"]))
    if shape == "userinfo":
        url = f"{scheme}{separator}{user}:{secret}@{host}{path}{query}"
    elif shape == "option":
        url = f"{scheme}{separator}{host}{path}?{option}={secret}{after}"
    else:  # with no @host after it, an @ in the password makes the rest a host, a / a unix socket's path
        url = f"{scheme.replace('unix', 'redis')}{separator}{user}:{secret.replace('@', '')}"
    return url, secret


def leaks(secret: str, text: str) -> list[str]:
    return [run for run in re.findall(f"[{RUN}]{{3,}}", secret) if run in text]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(urls_with_a_password())
def test_no_part_of_a_password_in_an_error_or_in_status(case: tuple[str, str]) -> None:
    url, secret = case
    try:
        settings_ = load({}, {"REDIS_URL": url})
    except ConfigError as e:
        message = str(e)
        assert len(message.splitlines()) == 1
        assert message.startswith("REDIS_URL=") and ALLOWED in message, message
        assert not leaks(secret, message), (url, message)
    else:
        assert not leaks(secret, str(settings_.describe())), (url, settings_.describe())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=urls_with_a_password())
def test_the_cli_refuses_a_malformed_url_in_one_line_without_its_password(
    case: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    url, secret = case
    try:
        check_url(url)
    except BadURL:
        pass
    else:
        assume(False)  # a URL that is taken would start a supervisor
    run_dir = tmp_path_factory.mktemp("run")
    result = subprocess.run(
        [sys.executable, "-m", "resque_starter", "run"],
        env=base_env(url, str(run_dir)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert "REDIS_URL=" in result.stderr and ALLOWED in result.stderr, result.stderr
    assert not leaks(secret, result.stderr), (url, result.stderr)
