"""Where webhooks may go: the webhook settings, and the check the API makes on a job's own URL."""

import base64
import re

import pytest
from pydantic import ValidationError

from app.webhook_urls import is_public, webhook_url_problem
from tests.conftest import make_settings

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def settings(tmp_path, **overrides):
    return make_settings(tmp_path, "sqlite://", **({"webhook_secret": SECRET} | overrides))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/hook", "http://10.0.0.7/", "http://192.168.1.1/",
    "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://[fe80::1]/",
    "http://[fd00::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://100.64.0.1/", "http://224.0.0.1/",
])
def test_non_public_addresses_are_refused_under_any_public_host(tmp_path, url):
    problem = webhook_url_problem(url, settings(tmp_path, webhook_allowed_hosts="*"))
    assert problem is not None and "non-public address" in problem and "WEBHOOK_ALLOWED_HOSTS" in problem


def test_a_listed_host_is_allowed_whatever_its_address(tmp_path):
    node = settings(tmp_path, webhook_allowed_hosts="localhost, 10.0.0.7,[::1], Hooks.Internal.")
    for url in ("http://localhost:8080/hook", "http://10.0.0.7/", "http://[::1]:9000/x", "https://hooks.internal/x"):
        assert webhook_url_problem(url, node) is None, url
    assert webhook_url_problem("http://127.0.0.1/", node) == "host 127.0.0.1 is not on WEBHOOK_ALLOWED_HOSTS"


def test_public_addresses_pass_under_any_public_host(tmp_path):
    assert webhook_url_problem("https://93.184.215.14/hook?token=x", settings(tmp_path, webhook_allowed_hosts="*")) is None
    assert is_public("2606:4700:4700::1111") and not is_public("::ffff:10.0.0.1")


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",  # NAT64 to 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 to 127.0.0.1
    "64:ff9b:1::808:808",  # local-use NAT64: refused whatever it embeds
    "2002:a9fe:a9fe::1",  # 6to4 through 169.254.169.254
    "2002:7f00:1::",  # 6to4 through 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "2001:0:808:808:0:0:f7f7:f7f7",  # Teredo: refused whatever it embeds
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::808:808",  # IPv4-compatible (deprecated): refused whatever it embeds
])
def test_ipv6_addresses_that_reach_ipv4_hosts_are_refused(tmp_path, address):
    assert not is_public(address)
    assert "non-public address" in webhook_url_problem(f"http://[{address}]/", settings(tmp_path, webhook_allowed_hosts="*"))


def test_ipv6_addresses_that_reach_public_ipv4_hosts_pass():
    assert is_public("64:ff9b::808:808") and is_public("2002:808:808::1")


def test_only_listed_hosts_without_any_public_host(tmp_path):
    node = settings(tmp_path, webhook_allowed_hosts="hooks.example.com")
    assert webhook_url_problem("https://93.184.215.14/", node) == "host 93.184.215.14 is not on WEBHOOK_ALLOWED_HOSTS"
    assert webhook_url_problem("https://other.example.com/", settings(tmp_path)) == (
        "host other.example.com is not on WEBHOOK_ALLOWED_HOSTS")  # none listed: no job may name its own


@pytest.mark.parametrize("url, expected", [
    ("ftp://hooks.example.com/x", "must be an http or https URL"),
    ("hooks.example.com/x", "must be an http or https URL"),
    ("https:///x", "has no host"),
    ("https://user:pw@hooks.example.com/x", "must not carry credentials"),
    ("https://hooks.example.com:99999/x", "is not a valid URL"),
    ("https://hooks.example.com/" + "a" * 2000, "is longer than 2000 characters"),
])
def test_malformed_urls_are_named(tmp_path, url, expected):
    assert expected in webhook_url_problem(url, settings(tmp_path, webhook_allowed_hosts="hooks.example.com"))


def test_a_name_that_does_not_resolve_is_refused(tmp_path):
    problem = webhook_url_problem("https://nowhere.invalid/x", settings(tmp_path, webhook_allowed_hosts="*"))
    assert problem.startswith("host nowhere.invalid does not resolve")


def test_no_job_url_while_webhooks_are_off(tmp_path):
    assert webhook_url_problem("https://93.184.215.14/", make_settings(tmp_path, "sqlite://")) == (
        "webhooks are off on this server (WEBHOOK_SECRET is not set)")


@pytest.mark.parametrize("overrides, expected", [
    ({"webhook_url": "https://hooks.example.com/x"}, "need WEBHOOK_SECRET"),
    ({"webhook_allowed_hosts": "*"}, "need WEBHOOK_SECRET"),
    ({"webhook_secret": "whsec_not base64!"}, "must be 'whsec_' followed by base64"),
    ({"webhook_secret": "whsec_" + base64.b64encode(b"short").decode()}, "at least 24 bytes (it has 5)"),
    ({"webhook_secret": SECRET, "webhook_url": "ftp://hooks.example.com"}, "WEBHOOK_URL must be an http or https URL"),
])
def test_bad_webhook_settings_stop_the_node_saying_why(tmp_path, overrides, expected):
    with pytest.raises(ValidationError, match=re.escape(expected)):
        make_settings(tmp_path, "sqlite://", **overrides)


def test_a_secret_without_its_prefix_is_accepted(tmp_path):
    assert make_settings(tmp_path, "sqlite://", webhook_secret=SECRET.removeprefix("whsec_")).webhook_secret
