"""Who drives a batch: a lease in Redis (``SET NX PX``), renewed by its holder, so two server
processes never run one batch, and a dead server's batches are taken over once its lease runs out."""

from __future__ import annotations

import redis.asyncio

from ollm.contract import Keys

# Renew or give back the lease only while it is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """The leases one owner (a server process) takes, renews and gives back."""

    def __init__(self, connection: redis.asyncio.Redis, keys: Keys, owner: str, seconds: float) -> None:
        self.connection = connection
        self.keys = keys
        self.owner = owner
        self.ms = int(seconds * 1000)
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)

    async def take(self, batch_id: str) -> bool:
        """True if the batch was free and is now ours."""
        return bool(await self.connection.set(self.keys.batch_lease(batch_id), self.owner, nx=True, px=self.ms))

    async def renew(self, batch_id: str) -> bool:
        """False once the lease is no longer ours (it ran out; another owner may hold it)."""
        return bool(await self._renew(keys=[self.keys.batch_lease(batch_id)], args=[self.owner, self.ms]))

    async def release(self, batch_id: str) -> None:
        await self._release(keys=[self.keys.batch_lease(batch_id)], args=[self.owner])
