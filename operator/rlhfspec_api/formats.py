"""String formats Kubernetes and its tools enforce: names, keys, images, URLs, paths.

Where it sits: the field types of ``base`` (``ImageRef``, ``RedisUrl``, ``PathText`` ...) and
``metadata`` call these pure checks. Each returns ``None`` for a valid value or a short
problem text; the caller adds the field path and what is allowed. Regular expressions are
matched whole with ``fullmatch`` (``$`` would also match before a final newline).

The formats:

* DNS-1123 label: at most 63 of ``a-z 0-9 -``, starting and ending alphanumeric
  (namespaces, Service names).
* DNS-1123 subdomain: at most 253 characters, labels joined by dots (Secret, ConfigMap,
  PersistentVolumeClaim and StorageClass names).
* Label and annotation key: an optional DNS-subdomain prefix and ``/``, then a name of at
  most 63 of ``A-Z a-z 0-9 - _ .`` starting and ending alphanumeric. A label value is empty
  or such a name.
* Secret key: at most 253 of ``A-Z a-z 0-9 - _ .``, not ``.`` or ``..``, not starting ``..``.
* Image reference: ``[host[:port]/]path[:tag][@digest]``. The first component is a host
  when it holds ``.`` or ``:`` or is ``localhost`` (hosts may use capitals); path
  components are lowercase alphanumeric runs joined by ``.``, ``_``, ``__`` or dashes; a
  tag is at most 128 of ``A-Z a-z 0-9 _ . -`` not starting with ``.`` or ``-``; a digest
  is ``algorithm:hex`` with at least 32 hex digits. The name is at most 255 characters.
* Redis URL: ``redis://`` or ``rediss://``, a host, an optional port 1..65535 and an
  optional ``/db`` number; no credentials (the password belongs in a Secret), no
  whitespace or control characters.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(_LABEL)
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
MAX_IMAGE_NAME = 255

# RE2 patterns the CRD carries (anchored, no look-around): each accepts at least what the
# matching check below accepts; tests/unit/test_crd_admission holds them to that.
DNS_SUBDOMAIN_PATTERN = rf"^{_LABEL}(\.{_LABEL})*$".replace("(?:", "(")
SECRET_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
"""Secret key characters, not ``.``, ``..`` or starting with ``..``."""
_HOST_PATTERN = r"([a-zA-Z0-9]([-a-zA-Z0-9.]*[a-zA-Z0-9])?|\[[0-9a-fA-F:.]+\])"
_PORT_PATTERN = (
    r"0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
REDIS_URL_PATTERN = rf"^rediss?://{_HOST_PATTERN}(:({_PORT_PATTERN})?)?(/[0-9]{{0,5}})?$"
_COMPONENT_PATTERN = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    rf"^({_HOST_PATTERN}(:[0-9]+)?/)?{_COMPONENT_PATTERN}(/{_COMPONENT_PATTERN})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


def control_characters(value: str) -> str | None:
    if _CONTROL.search(value):
        return "contains a control character (a NUL, newline, tab ...)"
    return None


def dns_label(value: str) -> str | None:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        return "is not a DNS-1123 label"
    return None


def dns_subdomain(value: str) -> str | None:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        return "is not a DNS-1123 subdomain"
    return None


def _qualified_name(value: str) -> bool:
    return len(value) <= 63 and _QUALIFIED_NAME.fullmatch(value) is not None


def label_key(value: str) -> str | None:
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns_subdomain(prefix)):
        return "has an invalid prefix (a DNS-1123 subdomain before the '/')"
    if not _qualified_name(name):
        return "is not a valid key"
    return None


def label_value(value: str) -> str | None:
    if value and not _qualified_name(value):
        return "is not a valid label value"
    return None


def secret_key(value: str) -> str | None:
    if len(value) > 253 or not _SECRET_KEY.fullmatch(value):
        return "is not a valid Secret key"
    if value in (".", "..") or value.startswith(".."):
        return "must not be '.' or '..' or start with '..'"
    return None


def image_reference(value: str) -> str | None:
    rest, at, digest = value.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        return "has an invalid digest"
    name, tag = rest, ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:  # a colon after the last slash starts the tag (host:port has a slash after)
        name, _, tag = rest.rpartition(":")
        if not _TAG.fullmatch(tag):
            return "has an invalid tag"
    if not name or len(name) > MAX_IMAGE_NAME:
        return f"has no name or a name longer than {MAX_IMAGE_NAME} characters"
    components = name.split("/")
    first = components[0]
    if len(components) > 1 and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            return "has an invalid registry host"
        components = components[1:]
    if not all(_PATH_COMPONENT.fullmatch(c) for c in components):
        return "has an invalid repository path (lowercase letters, digits and separators)"
    return None


def _host(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        return dns_subdomain(hostname) is None


def redis_url(value: str) -> str | None:
    if _CONTROL.search(value) or " " in value or not value.isascii():
        return "contains whitespace, a control or a non-ASCII character"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "is not a URL with a valid port"
    if parts.scheme not in ("redis", "rediss"):
        return "is not a redis:// or rediss:// URL"
    if parts.username is not None or parts.password is not None:
        return "carries credentials (put the password in passwordSecret)"
    if not parts.hostname or not _host(parts.hostname):
        return "names no valid host"
    if port is not None and not 1 <= port <= 65535:
        return "has a port outside 1..65535"
    if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", parts.path):
        return "has a path other than /<database number>"
    if parts.query or parts.fragment:
        return "has a query or fragment"
    return None
