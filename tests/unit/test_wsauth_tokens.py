"""Connection tokens (wsauth.tokens): keyring, rotation, and what each refusal is called."""

from __future__ import annotations

import time

import jwt
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from wsauth import tokens
from wsauth.models import ApiKey, hash_key

OLD = "old:" + "o" * 40
NEW = "new:" + "n" * 40


class FakeUser:
    pk = 7

    def get_session_auth_hash(self) -> str:
        return "hash-of-the-password"


def test_the_first_key_signs_and_every_key_verifies() -> None:
    with override_settings(WS_TOKEN_KEYS=OLD):
        old_token, ttl = tokens.issue(FakeUser())
    assert ttl == 300
    with override_settings(WS_TOKEN_KEYS=f"{NEW},{OLD}"):
        new_token, _ = tokens.issue(FakeUser(), rooms=["b", "a", "a"])
        assert jwt.get_unverified_header(new_token)["kid"] == "new"
        assert tokens.verify(old_token)["sub"] == "7"  # issued before the rotation: still valid
        claims = tokens.verify(new_token)
    assert claims["rooms"] == ["a", "b"]
    assert claims["aud"] == "switchboard.ws"
    assert claims["pwd"] == tokens.password_fingerprint(FakeUser())
    assert (
        "hash-of-the-password"
        not in jwt.decode(new_token, options={"verify_signature": False}).values()
    )
    with override_settings(WS_TOKEN_KEYS=NEW), pytest.raises(tokens.TokenRejected) as retired:
        tokens.verify(old_token)  # the old key dropped: its tokens end
    assert retired.value.reason == "unknown_key"


def test_without_keys_a_key_derived_from_the_secret_key_is_used() -> None:
    with override_settings(WS_TOKEN_KEYS=""):
        token, _ = tokens.issue(FakeUser())
        assert jwt.get_unverified_header(token)["kid"] == tokens.DERIVED_KID
        assert tokens.verify(token)["sub"] == "7"
    other_secret = override_settings(WS_TOKEN_KEYS="", SECRET_KEY="another-secret-key" * 3)
    with other_secret, pytest.raises(tokens.TokenRejected) as rejected:
        tokens.verify(token)
    assert rejected.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 1}, "expired"),
        ({"aud": "elsewhere"}, "wrong_audience"),
        ({"jti": None}, "malformed"),
    ],
)
def test_each_refusal_has_its_reason(claims: dict, reason: str) -> None:
    with override_settings(WS_TOKEN_KEYS=NEW):
        token, _ = tokens.issue(FakeUser())
        body = jwt.decode(token, options={"verify_signature": False})
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        forged = jwt.encode(body, "n" * 40, algorithm="HS256", headers={"kid": "new"})
        with pytest.raises(tokens.TokenRejected) as rejected:
            tokens.verify(forged)
    assert rejected.value.reason == reason
    assert token not in rejected.value.detail


def test_none_algorithm_and_garbage_are_refused() -> None:
    with override_settings(WS_TOKEN_KEYS=NEW):
        token, _ = tokens.issue(FakeUser())
        body = jwt.decode(token, options={"verify_signature": False})
        unsigned = jwt.encode(body, None, algorithm="none", headers={"kid": "new"})
        for bad in (unsigned, "garbage", token + "x"):
            with pytest.raises(tokens.TokenRejected):
                tokens.verify(bad)


@pytest.mark.parametrize("keys", ["nokid", "k:short", f"{NEW},{NEW}", ":" + "x" * 40])
def test_bad_keyrings_fail_clearly(keys: str) -> None:
    with override_settings(WS_TOKEN_KEYS=keys), pytest.raises(ImproperlyConfigured):
        tokens.keyring()


def test_tokens_are_found_only_in_the_token_subprotocol() -> None:
    assert tokens.from_subprotocols(["switchboard.v1", "token.abc.def.ghi"]) == "abc.def.ghi"
    assert tokens.from_subprotocols(["switchboard.v1"]) is None
    assert tokens.from_subprotocols([]) is None


def test_api_keys_are_stored_as_hashes() -> None:
    row = ApiKey(name="t")
    key = row.assign_new_key()
    assert key.startswith(f"sbk_{row.prefix}_")
    assert row.hashed_key == hash_key(key) != key
    assert key not in (row.prefix, row.hashed_key)
