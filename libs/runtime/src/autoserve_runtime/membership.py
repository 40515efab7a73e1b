"""A service's members and who owns what, on the members KV bucket (no other coordinator).

Every hosted process is a member: it writes ``<service>.<member>`` with a per-key TTL
(``Nats-TTL``) and renews it every third of the TTL; it follows the other members of its
service with a KV watcher (the expiry of a dead member's key reaches it as a marker,
because the bucket has ``limit_marker_ttl``). ``owns(key)`` is rendezvous hashing over that
view (``ownership.owner_of``).

Fencing: a member owns nothing while its own lease may have lapsed, that is when its last
successful renewal is older than the TTL (it was paused, or cut off from NATS), and until it
has re-read the membership after that. Monotonic time keeps running through a SIGSTOP, so a
process resumed after its lease lapsed knows at once, before it acts on anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from .ownership import MemberRecord, MemberView, decode_record, encode_record, member_name, owner_of
from .provisioning import MEMBERS_BUCKET
from .tasks import cancel_all

log = structlog.get_logger("autoserve.membership")

# Longer than a NATS cluster's failover (a stream's leader election took up to about 8 s
# here, bench/RESULTS.md "Cluster: failover"), so a failover pauses no member's work.
DEFAULT_TTL_SECONDS = 15.0
EXPIRY_GRACE_SECONDS = 1.0  # beyond a member's TTL before this process drops it itself
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream: the subject's last sequence is not the one named
LOAD_TIMEOUT_SECONDS = 30.0
# Members of a service that each need a durable consumer of their own (detector, breaker,
# alerter) take one of this many slots; the NATS permissions list each slot's durable.
MEMBER_SLOTS = 8

OnChange = Callable[[], None]


def member_ttl() -> float:
    """``AUTOSERVE_MEMBER_TTL`` (whole seconds, at least 1: JetStream's TTL unit here)."""
    text = os.environ.get("AUTOSERVE_MEMBER_TTL", "")
    try:
        ttl = float(text) if text else DEFAULT_TTL_SECONDS
    except ValueError:
        raise ValueError(f"AUTOSERVE_MEMBER_TTL: expected seconds such as 15, got {text!r}") from None
    if ttl < 1 or ttl != int(ttl):
        raise ValueError(f"AUTOSERVE_MEMBER_TTL: expected a whole number of seconds >= 1, got {text!r}")
    return ttl


def default_member(suffix: str = "") -> str:
    """``AUTOSERVE_MEMBER``, else the host name and the process id: unique on the host, and
    readable in ``autoserve status``."""
    chosen = os.environ.get("AUTOSERVE_MEMBER")
    base = chosen if chosen else f"{socket.gethostname()}-{os.getpid()}"
    return member_name(f"{base}{suffix}")


def slot_durable(durable: str, slot: int | None) -> str:
    """Slot 0 keeps the service's historic durable name, so one member works as before."""
    return durable if not slot else f"{durable}-{slot}"


class Membership:
    def __init__(
        self,
        js: JetStreamContext,
        service: str,
        member: str | None = None,
        *,
        ttl: float | None = None,
        describe: Callable[[], str] = lambda: "",
        slots: int = 0,
    ) -> None:
        self._js = js
        self.service = service
        self.member = member or default_member()
        self.ttl = ttl or member_ttl()
        self.key = f"{service}.{self.member}"
        self.describe = describe
        self.view = MemberView()
        self.on_change: list[OnChange] = []
        self.started_at = time.time()
        self._kv: KeyValue | None = None
        self._renewed_at = -1e18  # monotonic
        self._seq = 0  # the stream sequence of our last renewal
        self._view_loaded = asyncio.Event()
        self._fresh = False  # the view was (re)read since the lease last lapsed
        self._was_fenced = True
        self._notified_members: frozenset[str] = frozenset()
        self._left = False
        self.slot_lost = False
        self._stopped = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reload = asyncio.Event()
        self._generation = 0  # reload requests: a watcher publishes only the view of its own
        self.lapses = 0  # times this member's lease lapsed (paused or cut off)
        self.slots = slots
        self.slot: int | None = None
        self._slot_lease: Lease | None = None

    # -- what services ask ----------------------------------------------------------------

    @property
    def members(self) -> frozenset[str]:
        return self.view.members

    @property
    def fenced(self) -> bool:
        """True while this member may not act as an owner: its lease may have lapsed. A
        member that was alone in its last view is not fenced by a late renewal (a NATS outage
        or failover): nobody it knows of can have taken its work over, and a member that joins
        meanwhile at worst repeats work whose outputs are idempotent (deterministic ids,
        chained breaker transitions, idempotency keys). One service keeps working as before."""
        if self._left or self.slot_lost or not self._fresh:
            return True
        return time.monotonic() - self._renewed_at > self.ttl and not self.alone

    def why_fenced(self) -> str:
        """Why ``fenced`` holds, for ``/readyz``."""
        if self._left:
            return "leaving: its work is handed over"
        if self.slot_lost:
            return f"its slot was taken by another member: restart it to take a free one (of {self.slots})"
        if not self._fresh:
            return "re-reading the members after its key expired: owning nothing until then"
        return f"no membership renewal within {self.ttl:g}s: owning nothing until it is renewed"

    @property
    def alone(self) -> bool:
        """No other member of the service in the last view."""
        return self.view.members <= {self.member}

    def owner(self, key: str) -> str | None:
        return owner_of(key, self.view.members | {self.member})

    def owns(self, key: str) -> bool:
        return not self.fenced and self.owner(key) == self.member

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join, and return once the view holds every member of the service."""
        self._kv = await self._js.key_value(MEMBERS_BUCKET)
        if self.slots:
            await self._take_slot()
        await self._renew()
        self._tasks = [
            asyncio.create_task(self._follow(), name=f"members-{self.service}"),
            asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.service}"),
        ]
        await asyncio.wait_for(self._view_loaded.wait(), LOAD_TIMEOUT_SECONDS)
        log.info("joined", service=self.service, member=self.member, members=sorted(self.members), ttl=self.ttl)

    async def leave(self) -> None:
        """Stop owning at once and delete the key, so the others take over now rather than
        after the TTL (a graceful stop)."""
        if self._left:
            return
        self._left = True
        self._notify()
        await cancel_all(self._tasks[1:])
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self.key)
        log.info("left", service=self.service, member=self.member)

    async def stop(self) -> None:
        """At teardown, after the drain: the slot (and its durable) is free for another
        member only once this one has stopped acknowledging on it."""
        await self.leave()
        if self._slot_lease is not None:
            await self._slot_lease.release()
        self._stopped = True
        await cancel_all(self._tasks)

    # -- slots ----------------------------------------------------------------------------

    async def _take_slot(self, timeout: float = LOAD_TIMEOUT_SECONDS) -> None:
        """The lowest free slot of ``slots`` (``lease.<service>.slot<k>``): a member whose work
        needs a durable consumer of its own uses the slot's (``slot_durable``), so a restarted
        member continues from where a slot's last holder stopped, and two members never
        share one. Waits (up to ``timeout``, a dead holder's TTL) when every slot is held."""
        deadline = time.monotonic() + timeout
        while True:
            for slot in range(self.slots):
                lease = Lease(self._js, f"{self.service}.slot{slot}", self.member, self.ttl, lambda: self.alone)
                if await lease.try_take():
                    self.slot, self._slot_lease = slot, lease
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.service}: all {self.slots} member slots are held; "
                                   f"at most {self.slots} members of it can run at once")  # fmt: skip
            await asyncio.sleep(min(1.0, self.ttl / 3))

    async def _renew_slot(self) -> None:
        # A renewal refused because the key expired (a server stall past the TTL) finds the
        # slot free on the second try, and takes it back; only another holder loses it.
        if self._slot_lease is None or await self._slot_lease.try_take() or await self._slot_lease.try_take():
            return
        # Our slot lapsed and another member took it (we were paused past the TTL): its
        # durable is theirs now. Stop owning anything; the service fails its readiness.
        self.slot_lost = True
        log.error("member slot lost to another member; this member owns nothing from now on",
                  service=self.service, member=self.member, slot=self.slot)  # fmt: skip

    # -- renewing -------------------------------------------------------------------------

    def record(self) -> MemberRecord:
        return MemberRecord(
            service=self.service, member=self.member, host=socket.gethostname(), pid=os.getpid(),
            started_at=self.started_at, renewed_at=time.time(), ttl_seconds=self.ttl, owns=self.describe(),
        )  # fmt: skip

    async def _renew(self) -> None:
        """Write our record again. Each renewal names the previous one
        (``Nats-Expected-Last-Subject-Sequence``): accepted, nothing was written to our key
        in between, so it never expired and nobody can have taken our work over, however
        late this renewal is (a stall shorter than the server's own expiry). Refused, the
        key expired or was rewritten: a real lapse, and we re-read the members before
        owning anything again."""
        sent = time.monotonic()
        subject = f"$KV.{MEMBERS_BUCKET}.{self.key}"
        payload, wait = encode_record(self.record()), self.ttl / 3
        try:
            headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(self._seq)} if self._seq else None
            ack = await self._js.publish(subject, payload, msg_ttl=self.ttl, timeout=wait, headers=headers)
            broken = not self._seq
        except APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
            # A renewal that timed out may have been stored all the same: our own record
            # last on the key is no break.
            last = await self._last_record(subject)
            broken = last is None or last[1] != (self.record().pid, self.started_at)
            headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(last[0])} if last and not broken else None
            ack = await self._js.publish(subject, payload, msg_ttl=self.ttl, timeout=wait, headers=headers)
        self._seq = ack.seq
        late = sent - self._renewed_at > self.ttl
        if broken and self._renewed_at > 0 and self.alone:
            # Alone in the last view: nobody it knew of can have taken over. Keep working;
            # the fresh read of the members shows anyone who joined meanwhile.
            log.warning("membership key expired while alone (NATS away past the TTL); re-reading the members",
                        service=self.service, member=self.member)  # fmt: skip
            self._request_reload()
        elif broken:
            if self._renewed_at > 0:
                self.lapses += 1
                log.warning("membership lapsed (our key expired); re-reading the members before owning anything",
                            service=self.service, member=self.member,
                            lapsed_for=round(max(0.0, sent - self._renewed_at - self.ttl), 1))  # fmt: skip
            self._fresh = False
            self._request_reload()
        elif late:
            log.info("membership renewed late, before the key expired: nobody took over",
                     service=self.service, member=self.member, late_by=round(sent - self._renewed_at - self.ttl, 1))  # fmt: skip
        self._renewed_at = sent

    async def _last_record(self, subject: str) -> tuple[int, tuple[int, float]] | None:
        """The last entry on our key: its sequence and whose record it is (pid, start)."""
        try:
            msg = await self._js.get_msg(f"KV_{MEMBERS_BUCKET}", subject=subject)
        except NotFoundError:
            return None
        record = decode_record(msg.data or b"")
        return (msg.seq or 0, (record.pid, record.started_at)) if record else None

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            for renewal in (self._renew_slot, self._renew):  # one failing must not skip the other
                try:
                    await renewal()
                except Exception as exc:  # keep trying: NATS may be electing or away
                    log.warning("membership renewal failed", service=self.service, error=repr(exc))
            self._notify()

    # -- following ------------------------------------------------------------------------

    async def _follow(self) -> None:
        # Checks ``_stopped`` as well as cancellation: in Python 3.11 ``asyncio.wait_for``
        # (inside nats-py's ``updates``) can swallow a cancel that races its result.
        while not self._stopped:
            self._reload.clear()
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("members watch failed; watching again", service=self.service, error=repr(exc))
                await asyncio.sleep(min(1.0, self.ttl / 3))

    async def _watch_once(self) -> None:
        assert self._kv is not None
        generation = self._generation
        watcher = await self._kv.watch(f"{self.service}.>")
        view, loaded = MemberView(), False
        try:
            while not self._reload.is_set() and not self._stopped:
                try:
                    entry = await watcher.updates(timeout=self.ttl / 3)
                except nats.errors.TimeoutError:
                    entry = None
                now = time.monotonic()
                if entry is not None:
                    member = entry.key.removeprefix(f"{self.service}.")
                    record = decode_record(entry.value or b"")
                    if entry.operation in (KV_DEL, KV_PURGE) or record is None:
                        view.remove(member)
                    else:
                        view.put(record, now)
                    # Loaded once the watcher has delivered what was stored at its start
                    # (our own key is there, so there is at least one entry).
                    loaded = loaded or entry.delta == 0
                if not self._lapsed(now):  # a view frozen while we are cut off keeps the others
                    view.expire(now, EXPIRY_GRACE_SECONDS, keep=self.member)
                if loaded and generation == self._generation:  # not a view read before a lapse
                    self._publish_view(view)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _request_reload(self) -> None:
        self._generation += 1
        self._reload.set()

    def _lapsed(self, now: float) -> bool:
        return now - self._renewed_at > self.ttl

    def _publish_view(self, view: MemberView) -> None:
        self.view = view
        if not self._fresh:
            self._fresh = True
            self._view_loaded.set()
        self._notify()

    def _notify(self) -> None:
        """Tell the service when what it owns may have changed: the members, or fencing."""
        fenced, members = self.fenced, self.view.members
        if fenced == self._was_fenced and members == self._notified_members:
            return
        if members != self._notified_members:
            log.info("members changed", service=self.service, members=sorted(members), fenced=fenced)
        self._was_fenced, self._notified_members = fenced, members
        for callback in self.on_change:
            try:
                callback()
            except Exception:
                log.exception("ownership change handler failed", service=self.service)


class Lease:
    """One holder at a time for ``name`` (``lease.<name>`` in the members bucket): taken when
    the key is free (never written, deleted, or expired by its TTL), renewed with a
    revision-checked update, lapsing by TTL when the holder dies. ``held`` follows the same
    fencing rule as membership: not beyond the TTL after the last renewal that succeeded."""

    def __init__(
        self, js: JetStreamContext, name: str, holder: str, ttl: float, alone: Callable[[], bool] = lambda: False
    ) -> None:
        self._js = js
        self.key = f"lease.{name}"
        self.holder = holder
        self.ttl = ttl
        self._alone = alone  # as for membership: alone, a late renewal does not give the lease up
        self._kv: KeyValue | None = None
        self._revision = 0
        self._renewed_at = -1e18

    @property
    def held(self) -> bool:
        return self._revision > 0 and (time.monotonic() - self._renewed_at <= self.ttl or self._alone())

    async def try_take(self) -> bool:
        """Take the lease if it is free, or renew it if this holder has it; True if held."""
        kv = await self._bucket()
        sent = time.monotonic()
        if self.held:
            last = self._revision
        else:
            holder, last = await self._last()
            if holder not in (None, self.holder):  # ours after a lapse (not expired yet): renew it
                self._revision = 0
                return False
        try:
            self._revision = await kv._update(self.key, self.holder.encode(), last=last, msg_ttl=self.ttl)
        except KeyWrongLastSequenceError:
            holder, last = await self._last()
            if holder != self.holder and not (holder is None and self._alone()):
                self._revision = 0  # taken by another in between, or expired before our renewal
                return False
            # Ours: a renewal that timed out was stored all the same. Or it expired while we
            # were alone (NATS away past the TTL): nobody can have held it since.
            self._revision = await kv._update(self.key, self.holder.encode(), last=last, msg_ttl=self.ttl)
        self._renewed_at = sent
        return True

    async def release(self) -> None:
        """Free it for the next holder (a graceful stop); never raises: NATS may be away."""
        if self._revision:
            with contextlib.suppress(Exception):
                await (await self._bucket()).delete(self.key, last=self._revision)
        self._revision = 0

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(MEMBERS_BUCKET)
        return self._kv

    async def current_holder(self) -> str | None:
        return (await self._last())[0]

    async def _last(self) -> tuple[str | None, int]:
        """The holder (None when free) and the key's last revision (0: never written).
        Read directly, not with ``KeyValue.get``: nats-py 2.16 takes the server's TTL-expiry
        marker (``Nats-Marker-Reason``) for a value."""
        try:
            msg = await self._js.get_msg(f"KV_{MEMBERS_BUCKET}", subject=f"$KV.{MEMBERS_BUCKET}.{self.key}")
        except NotFoundError:
            return None, 0
        headers = msg.headers or {}
        if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers:
            return None, msg.seq or 0
        return (msg.data or b"").decode() or None, msg.seq or 0
