"""Secrets stay secret: scrubbing what leaves the process, masking what is shown, encrypting what is stored.

- :func:`scrub` is the one function every upstream (provider) message goes through before it reaches a
  client, a log at INFO or above, the request log or a profiling report: bearer/basic tokens,
  ``sk-…`` keys, ``api-key``/``x-api-key``/``Authorization``/``password``/``secret`` values, URL
  passwords and every provider key of the registry (:func:`remember`, verbatim) become ``***``; with
  ``hosts=True`` the registry's internal upstream ``host:port`` (and bare IP:port) become ``<upstream>``.
  :class:`ScrubFilter` applies it to log records (``uniroute serve`` installs it on the root handlers).
- :func:`mask` masks every secret-looking value of a (nested) ``litellm_params`` for display: values under
  secret-looking names (``api_key``, ``extra_headers.Authorization``, ...), URL passwords, bearer tokens
  and ``sk-…`` keys anywhere; ``os.environ/NAME`` references are shown as written.
- Admin policy (:func:`admin_params`): ``os.environ/NAME`` only for names on ``admin.env_allowlist``;
  literal secrets only with ``admin.allow_literal_keys``, and then stored encrypted (``encrypted/<Fernet
  token>``, key ``$UNIROUTE_SECRET_KEY``), decrypted only by :func:`resolve` when a registry entry is built.
- config.yaml's literal secrets (and ``${VAR}`` values) are masked in the ``models`` table; the real values
  stay in memory (:func:`keep_config_params`) and :func:`restore` puts them back when an entry is built.
  A masked placeholder is never sent: :func:`resolve` refuses it.

Layer-free (pydantic-free too): every layer may import it.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

#: ``os.environ/NAME`` as a ``litellm_params`` value names an environment variable (LiteLLM's proxy convention).
ENV_REF = "os.environ/"
#: A value the gateway encrypted (admin API, ``admin.allow_literal_keys``): ``encrypted/<Fernet token>``.
ENCRYPTED_PREFIX = "encrypted/"
#: Environment variable holding the Fernet key (``python -c "from cryptography.fernet import Fernet;
#: print(Fernet.generate_key().decode())"``).
SECRET_KEY_ENV = "UNIROUTE_SECRET_KEY"
#: What a masked value is shown as.
MASK = "***"
#: Start of the placeholder a config.yaml secret leaves in the ``models`` table; never sent to a provider.
REDACTED_MARK = "<redacted"
TABLE_PLACEHOLDER = "<redacted: write it as os.environ/NAME to keep a reference>"
#: Environment variables the admin API may never name through a pattern (only by an exact allow-list entry).
PROTECTED_ENV_PREFIX = "UNIROUTE_"

#: The request being served (set by the HTTP middleware): connection errors name it instead of the host.
REQUEST_ID: ContextVar[str | None] = ContextVar("uniroute_request_id", default=None)

logger = logging.getLogger("uniroute.secrets")

#: names whose values are secrets (``max_tokens`` and other token counts are not)
_SECRET_NAME = re.compile(r"key|secret|token(?!s)|password|passwd|credential|authorization|cookie|signature",
                          re.IGNORECASE)
_NAMES = (r"(?:[A-Za-z0-9]+[-_])*(?:api[-_]?key|apikey|access[-_]?key|secret(?:[-_]?key)?|password|passwd|"
          r"authorization|proxy-authorization|(?:access|auth|bearer|refresh|session|id)[-_]?token|credentials?|"
          r"client[-_]?secret|cookie)")
_NAMED = re.compile(r"(?i)(?<![A-Za-z0-9_-])(" + _NAMES + r")(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
                    r"(?!\*\*\*)((?:(?:bearer|basic|token)\s+)?[^\s\"',;}&\\]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+(?!\*\*\*)[A-Za-z0-9._~+/=:\-]{4,}")
_SK = re.compile(r"\b(sk|pk|rk)-(?!\*\*\*)[A-Za-z0-9_\-]{6,}")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):([^\s@/]+)@")
_IP_PORT = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}:\d{1,5}\b|\blocalhost:\d{1,5}\b|\[[0-9a-fA-F:]+\]:\d{1,5}")
_MIN_KNOWN = 8  # shorter configured "keys" (e.g. the replay upstream's "replay") are not secrets worth a mask


class _Known:
    """Provider keys and upstream hosts of every registry entry this process has served (they only grow)."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.hosts: set[str] = set()
        self.secrets_re: re.Pattern[str] | None = None
        self.hosts_re: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str], hosts: Iterable[str]) -> None:
        s = {v for v in secrets if len(v) >= _MIN_KNOWN} - self.secrets
        h = {v for v in hosts if v} - self.hosts
        if s:
            self.secrets |= s
            self.secrets_re = _alternation(self.secrets)
        if h:
            self.hosts |= h
            self.hosts_re = _alternation(self.hosts, whole=True)


# a host name is replaced only where it stands as a whole name: not inside a word ("h" in "this") nor as the
# front of a longer name ("api.internal" in "api.internal.example"); a trailing port or path is fine
_NAME_BEFORE = r"(?<![A-Za-z0-9_.-])"
_NAME_AFTER = r"(?![A-Za-z0-9_-]|\.[A-Za-z0-9])"


def _alternation(values: Iterable[str], whole: bool = False) -> re.Pattern[str]:
    body = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.compile(f"{_NAME_BEFORE}(?:{body}){_NAME_AFTER}" if whole else body)


_KNOWN = _Known()


def remember(params_list: Iterable[Mapping[str, Any]]) -> None:
    """Note the secrets (values under secret-looking names, URL passwords) and the upstream hosts of resolved
    ``litellm_params``, so that :func:`scrub` removes them verbatim from any message."""
    secrets: list[str] = []
    hosts: list[str] = []
    for params in params_list:
        for path, value in _leaves(params):
            if not isinstance(value, str):
                continue
            if _secret_name(path):
                secrets.append(value)
                for prefix in ("Bearer ", "bearer ", "Basic "):
                    if value.startswith(prefix):
                        secrets.append(value[len(prefix):])
            if "://" in value:
                try:
                    u = urlsplit(value)
                    if u.password:
                        secrets.append(u.password)
                    if path[-1:] == ("api_base",) and u.hostname:
                        hosts.append(f"{u.hostname}:{u.port}" if u.port else u.hostname)
                except ValueError:
                    continue
    _KNOWN.add(secrets, hosts)


def scrub(text: str, *, hosts: bool = True) -> str:
    """``text`` (an upstream message) without credentials; with ``hosts``, without internal upstream hosts."""
    if not text:
        return text
    known = _KNOWN.secrets_re
    if known is not None:
        text = known.sub(MASK, text)
    text = _URL_PASSWORD.sub(r"\1:" + MASK + "@", text)
    text = _NAMED.sub(r"\1\2" + MASK, text)
    text = _BEARER.sub(r"\1 " + MASK, text)
    text = _SK.sub(r"\1-" + MASK, text)
    if hosts:
        if _KNOWN.hosts_re is not None:
            text = _KNOWN.hosts_re.sub("<upstream>", text)
        text = _IP_PORT.sub("<upstream>", text)
    return text


class ScrubFilter(logging.Filter):
    """Scrubs every record (message, arguments and traceback) that passes a handler it is installed on."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = scrub(msg, hosts=record.levelno > logging.DEBUG), ()
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, hosts=record.levelno > logging.DEBUG)
        record.exc_info = None
        return True


def install_log_scrubber(*names: str) -> None:
    """Put a :class:`ScrubFilter` on every handler of the named loggers (default: the root logger and
    uvicorn's, which a worker process has instead of the root's)."""
    for name in names or ("", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())


# ------------------------------------------------------------------------------------------ masking
def _secret_name(path: tuple[str, ...]) -> bool:
    return bool(path) and bool(_SECRET_NAME.search(path[-1]))


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, (*path, str(k)))
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v, path)
    else:
        yield path, value


def mask(value: Any, placeholder: str = MASK, name: str = "") -> Any:
    """``value`` (``litellm_params`` or any part of it) with every secret-looking value, however nested,
    replaced by ``placeholder``: values under secret-looking names, URL passwords, bearer tokens and
    ``sk-…`` keys in any string. ``os.environ/NAME`` references stay; encrypted values are masked."""
    if isinstance(value, Mapping):
        return {k: mask(v, placeholder, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask(v, placeholder, name) for v in value]
    if isinstance(value, str):
        if value.startswith(ENV_REF):
            return value
        if value.startswith(ENCRYPTED_PREFIX) or (name and _SECRET_NAME.search(name) and value):
            return placeholder
        if _looks_secret(value):
            return placeholder
        return _URL_PASSWORD.sub(r"\1:" + placeholder + "@", value)
    if name and _SECRET_NAME.search(name) and value is not None and not isinstance(value, bool):
        return placeholder
    return value


def _looks_secret(value: str) -> bool:
    return bool(_BEARER.search(value) or _SK.search(value) or _NAMED.search(value))


def keep_config_params(specs: Iterable[Any]) -> None:
    """Keep the ``litellm_params`` of config.yaml's models (``ModelSpec``s) in memory: the ``models`` table
    holds them masked, and :func:`restore` puts the real values back when a registry entry is built."""
    _CONFIG_PARAMS.clear()
    _CONFIG_PARAMS.update({s.name: dict(s.litellm_params) for s in specs})


_CONFIG_PARAMS: dict[str, dict[str, Any]] = {}


def restore(name: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """``stored`` params of model ``name`` with each value that is the table's mask of the config's value
    replaced by the config's value (kept in memory by :func:`keep_config_params`)."""
    original = _CONFIG_PARAMS.get(name)
    out = dict(stored)
    return out if original is None else _unmask(out, original)


def _unmask(stored: Any, original: Any) -> Any:
    if mask(original, TABLE_PLACEHOLDER) == stored:
        return original
    if isinstance(stored, Mapping) and isinstance(original, Mapping):
        return {k: _unmask(v, original[k]) if k in original else v for k, v in stored.items()}
    if isinstance(stored, list) and isinstance(original, list) and len(stored) == len(original):
        return [_unmask(s, o) for s, o in zip(stored, original, strict=True)]
    return stored


# ------------------------------------------------------------------------------------- resolution
def resolve(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``params`` with ``os.environ/NAME`` (at any depth) replaced by the variable's value and ``encrypted/…``
    values decrypted. A ``ValueError`` names an unset variable, an undecryptable value or a masked
    placeholder (which is never sent to a provider)."""
    return {k: _resolve(v, f"{where}.{k}") for k, v in params.items()}


def _resolve(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _resolve(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if value.startswith(ENV_REF):
        name = value[len(ENV_REF):]
        got = os.environ.get(name)
        if got is None:
            raise ValueError(f"{where}: environment variable {name} is not set")
        return got
    if value.startswith(ENCRYPTED_PREFIX):
        return decrypt(value, where)
    if REDACTED_MARK in value:
        raise ValueError(f"{where} holds a masked placeholder, not the secret (a secret written literally in "
                         f"config.yaml is only known to a gateway started with that config): write it as "
                         f"os.environ/NAME, or set it again through the admin API")
    return value


@functools.lru_cache(maxsize=4)
def _fernet(key: str) -> Any:
    from cryptography.fernet import Fernet

    try:
        return Fernet(key.encode())
    except (ValueError, TypeError):
        raise ValueError(f"${SECRET_KEY_ENV} is not a Fernet key (32 url-safe base64-encoded bytes; make one with "
                         f"`python -c \"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\"`)"
                         ) from None


def _key(action: str) -> Any:
    key = os.environ.get(SECRET_KEY_ENV)
    if not key:
        raise ValueError(f"${SECRET_KEY_ENV} is not set: it is needed to {action}")
    return _fernet(key)


def encrypt(value: str) -> str:
    """``encrypted/<Fernet token>`` of ``value`` with ``$UNIROUTE_SECRET_KEY``."""
    return ENCRYPTED_PREFIX + str(_key("encrypt literal keys").encrypt(value.encode()).decode())


def decrypt(value: str, where: str = "value") -> str:
    from cryptography.fernet import InvalidToken

    f = _key(f"decrypt {where}")
    try:
        return str(f.decrypt(value[len(ENCRYPTED_PREFIX):].encode()).decode())
    except InvalidToken:
        raise ValueError(f"{where}: cannot be decrypted with ${SECRET_KEY_ENV} (it was encrypted with another "
                         f"key)") from None


# ------------------------------------------------------------------------------------ admin policy
def env_allowed(name: str, allowlist: Iterable[str]) -> bool:
    """May the admin API reference ``os.environ/name``? Exact entries allow any name; patterns (``*_API_KEY``)
    never match a ``UNIROUTE_*`` variable."""
    for entry in allowlist:
        if entry == name:
            return True
        if any(c in entry for c in "*?[") and fnmatch.fnmatchcase(name, entry) \
                and not name.startswith(PROTECTED_ENV_PREFIX):
            return True
    return False


def admin_params(params: Mapping[str, Any], *, env_allowlist: Iterable[str],
                 allow_literal_keys: bool) -> tuple[dict[str, Any], list[str]]:
    """``litellm_params`` from the admin API as the table stores them, and the problems that refuse them.

    ``os.environ/NAME`` must be on the allow-list; a literal secret (a value under a secret-looking name,
    a URL password, a bearer token or ``sk-…`` key anywhere) is refused unless ``allow_literal_keys``,
    and then encrypted. Masked values (``***``, placeholders) and ``encrypted/…`` values are refused:
    send the secret itself or a reference."""
    allow = list(env_allowlist)
    problems: list[str] = []

    def walk(value: Any, where: str, name: str) -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, f"{where}.{k}", str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]", name) for i, v in enumerate(value)]
        if not isinstance(value, str) or not value:
            return value
        if value.startswith(ENV_REF):
            var = value[len(ENV_REF):]
            if not env_allowed(var, allow):
                problems.append(f"{where}: os.environ/{var} is not on admin.env_allowlist "
                                f"({', '.join(allow) or 'empty'}; patterns never match {PROTECTED_ENV_PREFIX}*)")
            return value
        if value.startswith(ENCRYPTED_PREFIX) or MASK in value or REDACTED_MARK in value:
            problems.append(f"{where}: holds a masked or encrypted value as shown by the gateway; send the secret "
                            f"itself or an os.environ/NAME reference")
            return value
        # a short value under a key name is the dummy key of a keyless upstream (EMPTY, none, replay), not a secret
        literal = (bool(_SECRET_NAME.search(name)) and len(value) >= _MIN_KNOWN) or bool(_URL_PASSWORD.search(value)) \
            or _looks_secret(value)
        if not literal:
            return value
        if not allow_literal_keys:
            problems.append(f"{where}: a literal secret is refused (admin.allow_literal_keys is false); write it "
                            f"as os.environ/NAME with NAME on admin.env_allowlist ({', '.join(allow) or 'empty'})")
            return value
        try:
            return encrypt(value)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            return value

    out = {k: walk(v, f"litellm_params.{k}", str(k)) for k, v in params.items()}
    return out, problems
