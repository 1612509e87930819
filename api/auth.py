"""Bearer tokens (JWT, HS256, one key shared by every API node), principals, roles and site scope."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

ROLES = ("nurse", "charge_nurse", "doctor", "dispatcher", "admin")
CLINICAL_ROLES = ("nurse", "charge_nurse", "doctor", "admin")
ALL_SITES = "*"
ISSUER = "vigil"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls, with what role, and which sites and units they may see (None: every unit of a site)."""

    username: str
    role: str
    sites: frozenset[str]
    units: frozenset[str] | None

    def sees_site(self, site_id: str | None) -> bool:
        return site_id is not None and (ALL_SITES in self.sites or site_id in self.sites)

    def sees(self, site_id: str | None, unit_id: str | None) -> bool:
        if not self.sees_site(site_id):
            return False
        # A caller scoped to units sees only what is in them: a patient in no bed is in none of them.
        return self.units is None or (unit_id is not None and unit_id in self.units)

    def site_filter(self) -> set[str] | None:
        """None when the caller sees every site."""
        return None if ALL_SITES in self.sites else set(self.sites)


def load_key(data_dir: Path, configured: str | None) -> str:
    """VIGIL_JWT_SECRET, else a key file in the data dir created on first start (0600)."""
    if configured:
        return configured
    path = data_dir / "jwt.key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(key)
    return key


class TokenIssuer:
    """Signs and verifies access tokens."""

    def __init__(self, key: str, *, ttl_s: int = 12 * 3600) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def issue(self, principal: Principal, now_s: int) -> str:
        claims = {
            "iss": ISSUER,
            "sub": principal.username,
            "role": principal.role,
            "sites": sorted(principal.sites),
            "units": None if principal.units is None else sorted(principal.units),
            "iat": now_s,
            "exp": now_s + self.ttl_s,
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        """Raises 401 with a short reason for a token that is expired, tampered with or malformed."""
        try:
            c = jwt.decode(
                token, self._key, algorithms=["HS256"], issuer=ISSUER, options={"require": ["exp", "sub"]}
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorised("token expired") from None
        except jwt.InvalidTokenError:
            raise _unauthorised("invalid token") from None
        role = c.get("role")
        if role not in ROLES:
            raise _unauthorised("invalid token")
        units = c.get("units")
        return Principal(
            c["sub"], role, frozenset(c.get("sites") or ()), None if units is None else frozenset(units)
        )


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


_bearer = HTTPBearer(auto_error=False)


def current_principal(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer":
        raise _unauthorised("missing bearer token")
    issuer: TokenIssuer = request.app.state.tokens
    return issuer.verify(creds.credentials)


def require(roles: Iterable[str]) -> Callable[..., Principal]:
    """A dependency that lets only the given roles through (403 otherwise)."""
    allowed = frozenset(roles)

    def dep(p: Principal = Depends(current_principal)) -> Principal:  # noqa: B008
        if p.role not in allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {p.role} may not do this")
        return p

    return dep
