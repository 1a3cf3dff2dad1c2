"""Issue #6, item 7: a ciphertext copied into another row does not open as that row's.

Someone with write access to the database (and no key) copies group A's sealed credential
into group B's row (or into another integration's row of A). The Keyring sealed the group
and integration inside the Fernet payload, so B's row is now ``corrupt``: the API answers
500 ``credential_corrupt`` naming the connection and never a secret, the list shows it, and
A's connection keeps working.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from broker.errors import CredentialCorrupt
from broker.runtime import Broker
from tests.security import security_support as sec

sec_broker = sec.sec_broker


async def copy_ciphertext(broker: Broker, source: tuple[str, str], target: tuple[str, str]) -> None:
    async with broker.session() as db, db.begin():
        result = await db.execute(
            text(
                "UPDATE connections SET credential = (SELECT credential FROM connections "
                "WHERE group_id = :sg AND integration = :si) "
                "WHERE group_id = :tg AND integration = :ti"
            ),
            {"sg": source[0], "si": source[1], "tg": target[0], "ti": target[1]},
        )
        assert result.rowcount == 1


@pytest.mark.parametrize(
    "target",
    [pytest.param(("gb", "hexkey"), id="other-group"),
     pytest.param(("ga", "other"), id="other-integration")],
)
async def test_ciphertext_copied_into_another_row_is_corrupt_there_and_leaks_nothing(
    sec_broker: Broker, target: tuple[str, str]
) -> None:
    group, name = target
    async with sec.app_client(sec_broker) as api:
        for g, n, key in (("ga", "hexkey", sec.KEY_A), (group, name, sec.KEY_B)):
            r = await api.post(f"/groups/{g}/integrations/custom/{n}", json={"api_key": key})
            assert r.status_code == 200, r.text
        await copy_ciphertext(sec_broker, ("ga", "hexkey"), target)

        async with sec_broker.session() as db:
            with pytest.raises(CredentialCorrupt, match="belongs to another connection"):
                await sec_broker.repository.get(db, group, name)

        r = await api.get(f"/groups/{group}/integrations/{name}/credentials")
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["code"] == "credential_corrupt"
        assert repr(group) in error["message"] and repr(name) in error["message"]
        for secret in (sec.KEY_A, sec.KEY_B, sec.KEY_A[-4:], sec.KEY_B[-4:]):
            assert secret not in r.text
        # Asked again, it is still refused (never A's key served from a cache).
        again = await api.get(f"/groups/{group}/integrations/{name}/credentials")
        assert again.status_code == 500 and sec.KEY_A not in again.text

        listing = (await api.get(f"/groups/{group}/integrations")).json()["integrations"]
        assert {i["name"]: i["status"] for i in listing}[name] == "corrupt"
        events = (await api.get(f"/groups/{group}/events")).json()["events"]
        assert next(e["kind"] for e in events if e["integration"] == name) == "corrupt"

        # Group A's own connection still works.
        r = await api.get("/groups/ga/integrations/hexkey/credentials")
        assert r.status_code == 200, r.text
        assert r.json() == {"credentials": {"api_key": sec.KEY_A}}
        if target[0] != "ga":
            listing = (await api.get("/groups/ga/integrations")).json()["integrations"]
            assert {i["name"]: i["status"] for i in listing}["hexkey"] == "connected"

        # Connecting again repairs it.
        r = await api.post(f"/groups/{group}/integrations/custom/{name}", json={
            "api_key": sec.KEY_B
        })
        assert r.status_code == 200, r.text
        r = await api.get(f"/groups/{group}/integrations/{name}/credentials")
        assert r.json() == {"credentials": {"api_key": sec.KEY_B}}
