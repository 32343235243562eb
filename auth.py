"""Auth0 bearer-token validation for the /extraction-jobs routes.

Tokens are RS256 JWTs checked against the tenant's JWKS, which is fetched lazily
and cached per app instance. Errors follow RFC 6750 (401 / 403 / 503).

jose, cryptography and httpx are imported inside the functions that need them,
so a process with auth disabled (or a Lambda cold start before the first
request) never pays for loading them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import HTTPException, Request
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

import settings as config
from models import MAX_SUBJECT_LENGTH, check_text

logger = logging.getLogger(__name__)

READ_SCOPE = "read:extraction-jobs"
WRITE_SCOPE = "write:extraction-jobs"
# Operators: cancel, retry, bulk actions, and changing a job another
# subject holds.
ADMIN_SCOPE = "admin:extraction-jobs"

REALM = "extraction-jobs"
ALGORITHM = "RS256"
LEEWAY_SECONDS = 60
JWKS_DEADLINE_SECONDS = 5.0  # for the whole fetch: connect, headers and body
JWKS_MAX_BYTES = 64 * 1024
JWKS_TTL_SECONDS = 600.0
# Keys are used past their TTL while refreshes fail, but no longer than this
# after the last successful fetch: a key the tenant removed must stop working.
JWKS_MAX_STALE_SECONDS = 24 * 3600.0
UNKNOWN_KID_COOLDOWN_SECONDS = 30.0
FAILED_FETCH_BACKOFF_SECONDS = 10.0

_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)


class InvalidToken(Exception):
    """The token cannot be accepted; the message is safe to show the client."""


class JwksFetchError(Exception):
    """The JWKS could not be fetched or held no usable key."""


class _FetchNeeded(Exception):
    """The key is not held fresh: finding it may take a network fetch."""


class KeysUnavailable(Exception):
    """No signing keys are held and the JWKS cannot be fetched right now."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("signing keys unavailable")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Principal:
    sub: str | None
    scopes: frozenset[str]
    azp: str | None = None  # the client application, for the request log
    admin: bool = False  # may act as an operator (ADMIN_SCOPE, or no checks)


@dataclass(frozen=True)
class AuthSettings:
    issuer: str
    audience: str
    jwks_url: str
    require_scopes: bool = True


def authenticator_for(settings: config.Settings) -> Authenticator | None:
    """Build the authenticator; None when auth is disabled. Does no network I/O."""
    if settings.auth_disabled:
        if settings.aws_lambda_function_name:
            logger.warning(
                "AUTH_DISABLED is set in Lambda function %s: /extraction-jobs "
                "accepts requests without any token.",
                settings.aws_lambda_function_name,
            )
        return None
    domain = settings.auth0_domain
    assert domain and settings.auth0_audience  # load_settings checked both
    return Authenticator(
        AuthSettings(
            issuer=settings.auth0_issuer or f"https://{domain}/",
            audience=settings.auth0_audience,
            jwks_url=settings.auth0_jwks_url
            or f"https://{domain}/.well-known/jwks.json",
            require_scopes=settings.auth_require_scopes,
        )
    )


class JwksCache:
    """Signing keys by kid, refreshed lazily and never more often than needed.

    Requests whose kid is held and fresh never take the lock. When the keys are
    stale, one thread refreshes while the others keep using what is held. An
    unknown kid refetches at most once per UNKNOWN_KID_COOLDOWN_SECONDS, so
    made-up kids cannot hammer the JWKS endpoint; after a failed fetch
    nothing is fetched for FAILED_FETCH_BACKOFF_SECONDS. Keys are dropped
    JWKS_MAX_STALE_SECONDS after the last successful fetch: from then on
    requests get KeysUnavailable (503) until a fetch succeeds again.
    """

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.clock = clock
        self._keys: dict[str, Any] = {}
        self._fresh_until = -math.inf
        self._usable_until = -math.inf
        self._no_fetch_until = -math.inf
        self._next_kid_refetch = -math.inf
        self._lock = threading.Lock()

    def key_for(self, kid: str, *, may_fetch: bool = True) -> Any | None:
        """The key for kid, or None if the JWKS does not list it.

        Raises KeysUnavailable when no usable keys are held and fetching fails;
        with `may_fetch` False, _FetchNeeded unless the key is held and fresh.
        """
        held = self._keys
        locked = False
        if kid in held:
            now = self.clock()
            if now < self._fresh_until:
                return held[kid]
            if now < self._usable_until and may_fetch:
                locked = self._lock.acquire(blocking=False)
                if not locked:
                    return held[kid]  # another thread is refreshing
        if not may_fetch:
            raise _FetchNeeded
        if not locked:
            self._lock.acquire()
        try:
            self._refresh_if_due(kid)
            now = self.clock()
            if self._keys and now >= self._usable_until:
                logger.warning(
                    "Dropping the JWKS keys: no successful fetch from %s for %d hours",
                    self.url,
                    JWKS_MAX_STALE_SECONDS // 3600,
                )
                self._keys = {}
            if not self._keys:
                wait = self._no_fetch_until - now
                raise KeysUnavailable(retry_after=max(1, math.ceil(wait)))
            return self._keys.get(kid)
        finally:
            self._lock.release()

    def _refresh_if_due(self, kid: str) -> None:
        now = self.clock()
        if now < self._no_fetch_until:
            return
        if now < self._fresh_until:
            if kid in self._keys or now < self._next_kid_refetch:
                return
            # Only refetches for unknown kids count towards the cooldown, so a
            # key rotated in right after start-up is picked up at once.
            self._next_kid_refetch = now + UNKNOWN_KID_COOLDOWN_SECONDS
        try:
            keys, ttl = self._fetch()
        except JwksFetchError as error:
            logger.warning("JWKS fetch from %s failed: %s", self.url, error)
            self._no_fetch_until = now + FAILED_FETCH_BACKOFF_SECONDS
            return
        self._keys = keys
        self._fresh_until = now + ttl
        self._usable_until = now + JWKS_MAX_STALE_SECONDS

    def _fetch(self) -> tuple[dict[str, Any], float]:
        """The usable keys by kid and how long they stay fresh."""
        body, cache_control = _download(self.url)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise JwksFetchError(f"the JWKS is not JSON: {error}") from None
        keys = _signing_keys(document)
        if not keys:
            raise JwksFetchError("the JWKS holds no usable RS256 signing key")
        return keys, _ttl(cache_control)


def _download(url: str) -> tuple[bytes, str]:
    """The body (at most JWKS_MAX_BYTES) and Cache-Control of a GET of url,
    within JWKS_DEADLINE_SECONDS in total.

    httpx's timeouts bound each network operation, not their sum: a server
    that sends a byte every few seconds would hold a fetch for as long as it
    likes. So the download runs in a thread of its own and is abandoned at
    the deadline; the thread stops at its next read (checking the deadline
    itself), so it outlives the deadline by at most one read timeout.
    """
    deadline = time.monotonic() + JWKS_DEADLINE_SECONDS
    outcome: list[tuple[bytes, str] | Exception] = []

    def run() -> None:
        try:
            outcome.append(_read_capped(url, deadline))
        except Exception as error:  # noqa: BLE001 - raised again in the caller
            outcome.append(error)

    worker = threading.Thread(target=run, name="jwks-fetch", daemon=True)
    worker.start()
    worker.join(JWKS_DEADLINE_SECONDS)
    if not outcome:
        raise JwksFetchError(f"no complete answer within {JWKS_DEADLINE_SECONDS:g} s")
    result = outcome[0]
    if isinstance(result, JwksFetchError):
        raise result
    if isinstance(result, Exception):
        # Whatever else a broken endpoint provokes is still a failed fetch.
        raise JwksFetchError(f"{type(result).__name__}: {result}") from result
    return result


def _read_capped(url: str, deadline: float) -> tuple[bytes, str]:
    import httpx

    chunks: list[bytes] = []
    size = 0
    try:
        with (
            httpx.Client(timeout=JWKS_DEADLINE_SECONDS) as client,
            client.stream(
                "GET", url, headers={"Accept-Encoding": "identity"}
            ) as response,
        ):
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if (
                declared.isascii()
                and declared.isdigit()
                and int(declared) > JWKS_MAX_BYTES
            ):
                raise JwksFetchError(
                    f"the JWKS is {declared} bytes, more than {JWKS_MAX_BYTES}"
                )
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > JWKS_MAX_BYTES:
                    raise JwksFetchError(
                        f"the JWKS is more than {JWKS_MAX_BYTES} bytes"
                    )
                if time.monotonic() > deadline:
                    raise JwksFetchError(
                        f"no complete answer within {JWKS_DEADLINE_SECONDS:g} s"
                    )
                chunks.append(chunk)
            return b"".join(chunks), response.headers.get("cache-control", "")
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise JwksFetchError(str(error) or type(error).__name__) from error


def _signing_keys(document: Any) -> dict[str, Any]:
    """RS256 signing keys by kid; entries that are not such keys are skipped."""
    from jose import jwk
    from jose.exceptions import JWKError

    entries = document.get("keys") if isinstance(document, dict) else None
    keys = {}
    for entry in entries if isinstance(entries, list) else []:
        if not _is_rs256_signing_key(entry):
            continue
        public_part = {name: entry[name] for name in ("kty", "kid", "n", "e")}
        try:
            keys[entry["kid"]] = jwk.construct(public_part, algorithm=ALGORITHM)
        except (JWKError, ValueError, TypeError) as error:
            logger.warning("Skipping JWK %r: %s", entry["kid"], error)
    return keys


def _is_rs256_signing_key(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("kty") == "RSA"
        and isinstance(entry.get("kid"), str)
        and isinstance(entry.get("n"), str)
        and isinstance(entry.get("e"), str)
        and entry.get("use", "sig") == "sig"
        and entry.get("alg", ALGORITHM) == ALGORITHM
    )


def _ttl(cache_control: str) -> float:
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return JWKS_TTL_SECONDS
    return min(JWKS_TTL_SECONDS, float(match.group(1)))


class Authenticator:
    """Validates access tokens for one app instance (holds its own JWKS cache)."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.jwks = JwksCache(settings.jwks_url)

    @property
    def require_scopes(self) -> bool:
        return self.settings.require_scopes

    def authenticate(self, token: str, *, may_fetch: bool = True) -> Principal:
        """Validate the token and return who sent it with which scopes.

        Raises InvalidToken (401) or KeysUnavailable (503); with `may_fetch`
        False, _FetchNeeded where the JWKS would have to be fetched first.
        """
        from jose import jwt
        from jose.exceptions import ExpiredSignatureError, JWTError

        try:
            header = jwt.get_unverified_header(token)
        except JWTError:
            raise InvalidToken("The token is not a well-formed JWT.") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"The token must be signed with {ALGORITHM}.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The token header has no key id (kid).")
        key = self.jwks.key_for(kid, may_fetch=may_fetch)
        if key is None:
            raise InvalidToken("The token is signed with an unknown key (kid).")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                options={
                    "require_exp": True,
                    "require_iss": True,
                    "require_aud": True,
                    "leeway": LEEWAY_SECONDS,
                },
            )
        except ExpiredSignatureError:
            raise InvalidToken("The token has expired.") from None
        except JWTError as error:
            raise InvalidToken(_describe(error)) from None
        except (TypeError, ValueError, OverflowError):
            # jose's time checks call int() on the claim: null, NaN or Infinity
            raise InvalidToken("The token's time claims must be numbers.") from None
        return Principal(
            sub=_subject(claims.get("sub")),
            scopes=_scopes(claims),
            azp=_client(claims.get("azp")),
        )


def _describe(error: Exception) -> str:
    """jose's message in words a client developer can act on."""
    message = str(error).replace('"', "'")
    known = {
        "Signature verification failed.": "The token signature is invalid.",
        "Invalid audience": "The token is not issued for this API (wrong audience).",
        "Invalid issuer": "The token is not issued by the expected issuer.",
        "The token is not yet valid (nbf)": "The token is not valid yet (nbf).",
    }
    return known.get(message, f"The token is invalid: {message}")


def _subject(value: Any) -> str:
    """The `sub` claim, which is stored as a job's `created_by` and keeps each
    caller's Idempotency-Keys apart: required, so no two callers share one
    namespace by both lacking it."""
    if not isinstance(value, str) or not value:
        raise InvalidToken("The token has no subject (sub).")
    try:
        check_text(value)
    except ValueError as error:
        raise InvalidToken(f"The token's subject (sub) {error}.") from None
    if len(value) > MAX_SUBJECT_LENGTH:
        raise InvalidToken(
            f"The token's subject (sub) is longer than {MAX_SUBJECT_LENGTH} characters."
        )
    return value


def _client(value: Any) -> str | None:
    """The `azp` claim (Auth0's client id) when it is short printable text."""
    if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
        return value
    return None


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Union of the space-separated `scope` claim and Auth0's RBAC `permissions`."""
    scope = claims.get("scope")
    permissions = claims.get("permissions")
    granted = set(scope.split()) if isinstance(scope, str) else set()
    if isinstance(permissions, list):
        granted.update(item for item in permissions if isinstance(item, str))
    return frozenset(granted)


def _challenge(**params: str) -> dict[str, str]:
    fields = [f'realm="{REALM}"'] + [
        f'{name}="{value}"' for name, value in params.items()
    ]
    return {"WWW-Authenticate": "Bearer " + ", ".join(fields)}


# With auth disabled every caller is this one, and may do everything.
ANONYMOUS = Principal(sub=None, scopes=frozenset(), admin=True)


class RequireScope(HTTPBearer):
    """A dependency that admits a request whose token grants `scope`, and
    tells `on_admit` the caller it admits (sub, azp), e.g. for the request log.

    It is FastAPI's `HTTPBearer` (so OpenAPI declares the same bearer scheme
    and Swagger UI's Authorize button works) that does the whole check
    itself: one dependency per request, not a bearer dependency under a
    scope dependency (FastAPI's per-dependency work is a measurable part of
    a request).

    Async, so it costs no hop to the threadpool: with auth disabled it returns
    at once, and a token signed with a key held fresh is checked right here
    (CPU work only). Only a token that needs the JWKS fetched first goes to
    the threadpool, where the fetch may block.
    """

    def __init__(
        self,
        scope: str,
        on_admit: Callable[[str | None, str | None], None] | None = None,
    ) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="HTTPBearer",
            description="Auth0 access token for the extraction-jobs API.",
        )
        self.scope = scope
        self.on_admit = on_admit

    async def __call__(self, request: Request) -> Principal:
        authenticator: Authenticator | None = request.app.state.authenticator
        if authenticator is None:
            return ANONYMOUS
        credentials = await super().__call__(request)
        if credentials is None:
            raise HTTPException(
                status_code=401,
                detail="Missing bearer token: send 'Authorization: Bearer <access token>'.",
                headers=_challenge(),
            )
        try:
            try:
                principal = authenticator.authenticate(
                    credentials.credentials, may_fetch=False
                )
            except _FetchNeeded:
                principal = await run_in_threadpool(
                    authenticator.authenticate, credentials.credentials
                )
        except InvalidToken as error:
            raise HTTPException(
                status_code=401,
                detail=f"Invalid access token: {error}",
                headers=_challenge(error="invalid_token", error_description=str(error)),
            ) from None
        except KeysUnavailable as error:
            raise HTTPException(
                status_code=503,
                detail="Token signing keys are unavailable right now; retry later.",
                headers={"Retry-After": str(error.retry_after)},
            ) from None
        scope = self.scope
        if authenticator.require_scopes and scope not in principal.scopes:
            raise HTTPException(
                status_code=403,
                detail=f"The token lacks the '{scope}' permission.",
                headers=_challenge(error="insufficient_scope", scope=scope),
            )
        if self.on_admit is not None:
            self.on_admit(principal.sub, principal.azp)
        admin = not authenticator.require_scopes or ADMIN_SCOPE in principal.scopes
        return replace(principal, admin=admin)
