"""Several gateway processes, one queue per pool: a dispatcher elected through Redis.

Every process (each `serve --processes` child, each replica) counts slots in its own
`Pool`; left alone, R of them send up to R x max_concurrency tries to a worker. So per
pool one process is elected the dispatcher, and its `Pool` core (the same code, the same
policy) serves every process's tries from one queue: the oldest waiting try that the
policy would give a free slot gets it, whichever process holds it.

    Dispatcher   sans-IO: the elected process's core fed with everyone's tries (tickets
                 from the wire), answering each owner with a grant or a failure
    Member       sans-IO: one process's side of one pool, set as the pool's `relay`:
                 its own tries go to the dispatcher, in this process (leading, or alone)
                 or through Redis (following); it takes the roles the driver gives it
    PoolLink     the asyncio driver on Redis: heartbeats and the election (one Lua
                 script), the dispatcher's inbox, each process's reply list, slot records
    Coordination every pool's link for the app's lifespan

Keys of pool P, all under the hash tag {gw:P} (one Redis Cluster slot):
    {gw:P}:leader       the dispatcher's id, SET NX PX lease_s, renewed every lease_s/3
    {gw:P}:epoch        a fresh token at each takeover: followers then send their state
    {gw:P}:members      ZSET process id -> expiry (Redis's clock): who is alive
    {gw:P}:inbox        LIST: tries, releases and withdrawals from followers
    {gw:P}:to:<id>      LIST: grants and failures for one process
    {gw:P}:slots:<id>   HASH: the slots one process holds (try id -> worker URL): a new
                        dispatcher starts from these
    {gw:P}:warm         HASH: worker URL -> its warm adapters, copied by the dispatcher

Failures. A process that stops heartbeating (SIGKILL) drops out of `members` within
2/3 lease_s; the dispatcher then frees its slots and forgets its waiters (their clients
are gone with it). A dispatcher that stops renewing loses the election after lease_s;
the next heartbeat of another process takes it, with a new epoch, and starts from the
slot records and the warm copy; every follower then sends its running tries and its
waiters (with their arrival times), so the queue order survives. A process that cannot
reach Redis runs alone: its core serves its own tries on its share of each worker's
slots (`share`), it says so once in the log and in gateway_coordination_fallbacks_total,
and when Redis answers again it rejoins as above (a restarted, empty Redis too): its
running tries keep their ids, so none is counted twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.balancer import Balancer, Outcome, Pool, Ticket, Worker
from gateway.causes import Cause
from gateway.errors import Overloaded, RequestError, UpstreamError
from gateway.registry import CoordinationSpec, Registry, redis_where

log = logging.getLogger("gateway.coordination")

Role = Literal["leader", "follower", "alone"]
Message = dict[str, Any]
# What a member asks its driver to write: ("inbox", message), ("reply", process,
# message), ("slot", process, try id, record or None), ("slots", records).
Op = tuple[Any, ...]
Slots = Mapping[str, Mapping[str, Message]]  # process -> try id -> {"w": url, "f": fields}

# Every way a Redis call fails: redis-py's errors (RedisClusterException is not a
# RedisError), OSError and timeouts, and RuntimeError, which uvloop raises for a write
# on a connection a Redis restart closed under redis-py's feet.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError, RuntimeError)
BLOCK_S = 0.5  # a blocking read's longest wait: how soon a reader sees a role change
BATCH = 256  # messages read at once after a blocking read

# Ticket fields that are the core's bookkeeping, not the try's: everything else a
# Ticket has (adapter, retry, and whatever fields policies add) crosses the wire.
_LOCAL_FIELDS = frozenset(
    {
        "notify",
        "exclude",
        "worker",
        "error",
        "queued_at",
        "granted_at",
        "passed_at",
        "wake_at",
        "overtaken",
        "recheck_at",
    }
)
_SCALARS = (str, int, float, bool, type(None))


# Ticket fields that are times on the sender's clock (monotonic: one per host). They
# cross the wire as seconds from now and become times on the receiver's clock again.
_CLOCK_FIELDS = frozenset({"deadline_at"})
_IN = "~in"  # the suffix of such a field on the wire


def wire_fields(ticket: Ticket, now: float) -> dict[str, Any]:
    """The try's own fields, generically: a policy's new Ticket field travels too."""
    found: dict[str, Any] = {}
    for field in dataclasses.fields(ticket):
        value = getattr(ticket, field.name)
        if field.name in _CLOCK_FIELDS and isinstance(value, float):
            found[field.name + _IN] = value - now
        elif field.name not in _LOCAL_FIELDS and isinstance(value, _SCALARS):
            found[field.name] = value
    return found


def ticket_from_wire(fields: Mapping[str, Any], now: float) -> Ticket:
    known = {f.name for f in dataclasses.fields(Ticket) if f.init} - _LOCAL_FIELDS
    values = {name: value for name, value in fields.items() if name in known}
    for name in _CLOCK_FIELDS & known:
        if isinstance(fields.get(name + _IN), (int, float)):
            values[name] = now + fields[name + _IN]
    return Ticket(**values)


def error_to_wire(exc: RequestError) -> Message:
    if isinstance(exc, UpstreamError):
        return {"cause": exc.cause.name, "detail": exc.detail}
    retry_after = getattr(exc, "retry_after_s", 1)
    return {"detail": str(exc.detail), "retry_after": retry_after}


def error_from_wire(data: Mapping[str, Any]) -> RequestError:
    if "cause" in data:
        exc = UpstreamError(Cause[data["cause"]], "")
        exc.detail = exc.args = data["detail"]
        return exc
    return Overloaded(data["detail"], retry_after_s=int(data.get("retry_after", 1)))


def share(slots: int, replicas: int, rank: int, index: int) -> int:
    """Process `rank`'s part of a worker's `slots` split over `replicas` processes: the
    parts add up to `slots` exactly; the remainder goes round, starting at another
    process on each worker (`index`), so that small workers do not all land on one."""
    base, extra = divmod(slots, max(1, replicas))
    return base + (1 if (rank - index) % max(1, replicas) < extra else 0)


def set_shares(pool: Pool, live: Iterable[str], me: str) -> None:
    """Each worker's capacity here: this process's share. A process left with no slot
    at all in the pool (fewer slots than processes) keeps one of one worker, so that it
    still serves: that pool may then be overcommitted by at most R - slots."""
    members = sorted(set(live) | {me})
    rank = members.index(me)
    for index, worker in enumerate(pool.workers):
        worker.capacity = share(worker.spec.max_concurrency, len(members), rank, index)
    if pool.workers and not any(w.capacity for w in pool.workers):
        pool.workers[rank % len(pool.workers)].capacity = 1


# -- the dispatcher: the pool's core serving everyone ----------------------------------


@dataclass(frozen=True)
class PoolView:
    """The dispatcher's view of its pool, copied to Redis at each of its heartbeats: what
    a follower's `/readyz?pool=` and `/status` report, since a follower's own `Pool`
    sees only its probes (tries fail and workers are ejected at the dispatcher)."""

    queue: int  # requests waiting, from every process
    workers: Mapping[str, Mapping[str, Any]]  # url -> state, in_service, in_flight, ejections

    @classmethod
    def of(cls, pool: Pool) -> PoolView:
        workers = {
            w.url: {
                "state": w.health.state.value,
                "in_service": w.in_service,
                "in_flight": w.in_flight,
                "ejections": w.stats.ejections,
            }
            for w in pool.workers
        }
        return cls(queue=len(pool.queue), workers=workers)

    @classmethod
    def from_json(cls, raw: str | bytes) -> PoolView:
        data = json.loads(raw)
        return cls(queue=int(data["queue"]), workers=data["workers"])

    def to_json(self) -> str:
        return json.dumps({"queue": self.queue, "workers": self.workers})

    def healthy(self) -> int:
        return sum(bool(w.get("in_service")) for w in self.workers.values())


class Dispatcher:
    """The elected process's core fed with every process's tries. `send(process,
    message)` answers an owner; `record(process, try id, record or None)` keeps the
    slot records a later dispatcher starts from."""

    def __init__(
        self,
        pool: Pool,
        *,
        send: Callable[[str, Message], None],
        record: Callable[[str, str, Message | None], None],
    ) -> None:
        self.pool = pool
        self.send = send
        self.record = record
        self.tickets: dict[str, Ticket] = {}
        self.owner: dict[Ticket, tuple[str, str]] = {}  # ticket -> (process, try id)
        # After a takeover: the processes whose state is still to come, and the tries
        # held back until then (so that all of them queue in arrival order).
        self.expecting: set[str] = set()
        self.held: dict[str, Message] = {}
        self.heard: dict[str, float] = {}  # process -> when a message of its was handled

    def owns(self, ticket: Ticket) -> bool:
        return ticket in self.owner

    def gather(self, processes: Iterable[str]) -> None:
        """A takeover: new tries wait until every one of `processes` has sent its
        state (`sync`), or until `settle`, so that the queue is rebuilt in order."""
        self.expecting = set(processes)

    def settle(self, live: Iterable[str] | None = None) -> None:
        """Stop waiting for the processes not in `live` (all of them: None)."""
        self.expecting = set() if live is None else self.expecting & set(live)
        self.handle([])

    def handle(self, messages: Iterable[Message]) -> None:
        """One read of the inbox. Releases and withdrawals first (they free slots for
        those already waiting, who came earlier); new tries then by arrival time, the
        processes' clocks, so a takeover's resubmissions keep their order."""
        tries = self.held
        now = self.pool.clock()
        for msg in messages:
            self.heard[msg["r"]] = now
            op = msg["op"]
            if op == "submit":
                tries[msg["id"]] = msg
            elif op == "withdraw" and msg["id"] in tries:
                del tries[msg["id"]]
            elif op == "sync":
                self.sync(msg)
                tries.update((m["id"], m) for m in msg["wait"])
                self.expecting.discard(msg["r"])
            elif op == "withdraw":
                self.withdraw(msg["id"])
            elif op == "release":
                self.release(msg["id"], msg.get("o", "cancelled"))
        if self.expecting:
            return
        self.held = {}
        for msg in sorted(tries.values(), key=lambda m: m["t"]):
            self.submit(msg)

    def submit(self, msg: Message) -> None:
        tid, process = msg["id"], msg["r"]
        if tid in self.tickets:
            return  # sent again after a takeover, and already known
        ticket = ticket_from_wire(msg["f"], self.pool.clock())
        ticket.notify = self._notified
        urls = set(msg.get("x", ()))
        ticket.exclude = tuple(w for w in self.pool.workers if w.url in urls)
        self._add(ticket, process, tid)
        try:
            self.pool.submit(ticket)
        except RequestError as exc:
            self._drop(ticket)
            self.send(process, {"op": "fail", "id": tid, "e": error_to_wire(exc)})

    def hold(self, process: str, tid: str, url: str, fields: Mapping[str, Any]) -> None:
        """A slot granted before (by another dispatcher, or while Redis was away)."""
        worker = self._worker(url)
        if tid in self.tickets or worker is None:
            return
        ticket = ticket_from_wire(fields, self.pool.clock())
        ticket.notify = self._notified
        self._add(ticket, process, tid)
        self.pool.hold(ticket, worker)
        self.record(process, tid, {"w": url, "f": fields})

    def withdraw(self, tid: str) -> None:
        ticket = self.tickets.get(tid)
        if ticket is not None:
            self._end(ticket, lambda: self.pool.withdraw(ticket))

    def release(self, tid: str, outcome: Outcome) -> None:
        ticket = self.tickets.get(tid)
        if ticket is not None:
            self._end(ticket, lambda: self.pool.release(ticket, outcome))

    def sync(self, msg: Message) -> None:
        """A process's own word on its tries: what it runs and what it waits for.
        Slots it no longer holds are freed; waiters it no longer has leave."""
        process, running = msg["r"], msg["run"]
        waiting = {m["id"] for m in msg["wait"]}
        for ticket, (owner, tid) in list(self.owner.items()):
            if owner != process:
                continue
            if ticket.worker is not None and tid not in running:
                self.release(tid, "cancelled")
            elif ticket.worker is None and tid not in waiting:
                self.withdraw(tid)
        for tid, (url, fields) in running.items():
            self.hold(process, tid, url, fields)

    def forget(self, process: str) -> None:
        """A process gone silent: its waiters leave with it, its slots come back."""
        for ticket, (owner, tid) in list(self.owner.items()):
            if owner == process and ticket.worker is None:
                self.withdraw(tid)
        for owner, tid in list(self.owner.values()):
            if owner == process:
                self.release(tid, "cancelled")

    def processes(self) -> set[str]:
        return {owner for owner, _ in self.owner.values()}

    def reset(self) -> None:
        """Forget everything, sending nothing: the waiters first, so that freeing the
        slots hands none out."""
        for ticket in [t for t in self.owner if t.worker is None]:
            self.pool.withdraw(ticket)
        for ticket in [t for t in self.owner if t.worker is not None]:
            self.pool.release(ticket, "cancelled")
        self.tickets.clear()
        self.owner.clear()
        self.expecting, self.held = set(), {}

    def _end(self, ticket: Ticket, action: Callable[[], None]) -> None:
        process, tid = self.owner[ticket]
        held = ticket.worker is not None
        action()  # while still ours: the pool asks `owns` through its relay
        self._drop(ticket)
        if held:
            self.record(process, tid, None)

    def _notified(self, ticket: Ticket) -> None:
        found = self.owner.get(ticket)
        if found is None:
            return
        process, tid = found
        if ticket.error is not None or ticket.worker is None:
            error = ticket.error or Overloaded("no slot", retry_after_s=1)
            self._drop(ticket)
            self.send(process, {"op": "fail", "id": tid, "e": error_to_wire(error)})
            return
        url = ticket.worker.url
        self.record(process, tid, {"w": url, "f": wire_fields(ticket, self.pool.clock())})
        self.send(process, {"op": "grant", "id": tid, "w": url})

    def _add(self, ticket: Ticket, process: str, tid: str) -> None:
        self.tickets[tid] = ticket
        self.owner[ticket] = (process, tid)

    def _drop(self, ticket: Ticket) -> None:
        _, tid = self.owner.pop(ticket)
        del self.tickets[tid]

    def _worker(self, url: str) -> Worker | None:
        return next((w for w in self.pool.workers if w.url == url), None)


# -- one process's side of one pool ------------------------------------------------------


class Member:
    """The pool's relay: this process's tries go to the dispatcher, wherever it runs.

    `out(op)` hands the driver what to write to Redis (never called while alone).
    `arrival` stamps each try for the queue order across processes: wall time, the
    one clock processes share (skew between hosts reorders only near-simultaneous
    arrivals, and only when a dispatcher reads them in one batch)."""

    def __init__(
        self,
        pool: Pool,
        *,
        me: str,
        out: Callable[[Op], None] = lambda op: None,
        arrival: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.me = me
        self.out = out
        self.arrival = arrival
        self.role: Role = "alone"
        self.epoch: str | None = None
        self.live: list[str] = [me]
        self.peers: list[str] = [me]  # who shares the slots while Redis is away
        self.dispatcher = Dispatcher(pool, send=self._send, record=self._record)
        self.tries: dict[str, Ticket] = {}  # this process's tries, waiting or running
        self.ids: dict[Ticket, str] = {}
        self.sent: dict[str, Message] = {}  # try id -> its submit message
        self.view: PoolView | None = None  # following: the dispatcher's, if fresh
        self._seq = 0
        pool.relay = self

    # -- the pool's relay ---------------------------------------------------------------

    def takes(self, ticket: Ticket) -> bool:
        return not self.dispatcher.owns(ticket)

    def submit(self, ticket: Ticket) -> None:
        self._seq += 1
        tid = f"{self.me}.{self._seq}"
        ticket.queued_at = self.pool.clock()
        msg = {
            "op": "submit",
            "id": tid,
            "r": self.me,
            "t": self.arrival(),
            "f": wire_fields(ticket, ticket.queued_at),
            "x": [w.url for w in ticket.exclude],
        }
        self.tries[tid], self.ids[ticket], self.sent[tid] = ticket, tid, msg
        self._to_dispatcher(msg)

    def withdraw(self, ticket: Ticket) -> None:
        tid = self.ids.get(ticket)
        if tid is None:
            return
        if ticket.worker is not None:
            self.release(ticket, "cancelled")
            return
        self._forget(ticket)
        self._to_dispatcher({"op": "withdraw", "id": tid, "r": self.me})

    def release(self, ticket: Ticket, outcome: Outcome) -> None:
        tid = self.ids.get(ticket)
        if tid is None or ticket.worker is None:
            return
        self._forget(ticket)
        self._to_dispatcher({"op": "release", "id": tid, "r": self.me, "o": outcome})

    # -- answers ------------------------------------------------------------------------

    def received(self, msg: Message) -> None:
        """A grant or a failure from the dispatcher, here or through Redis. One of
        another epoch is void: an old dispatcher's, whose state the sync replaced, or a
        new one's before this process heard of it (its coming sync settles that)."""
        if msg.get("ep", self.epoch) != self.epoch:
            return
        tid = msg["id"]
        ticket = self.tries.get(tid)
        if msg["op"] == "grant":
            if ticket is None:  # withdrawn while the grant was on its way: give it back
                self._to_dispatcher({"op": "release", "id": tid, "r": self.me, "o": "cancelled"})
                return
            if ticket.worker is not None:
                return  # a duplicate (a resubmission after a takeover)
            worker = next((w for w in self.pool.workers if w.url == msg["w"]), None)
            if worker is None:  # not a worker here (yet): a registry reload in between
                self.withdraw(ticket)
                ticket.error = Overloaded(f"pool {self.pool.name!r} is reloading", retry_after_s=1)
            else:
                ticket.worker, ticket.granted_at = worker, self.pool.clock()
            ticket.notify(ticket)
        elif msg["op"] == "fail" and ticket is not None and ticket.worker is None:
            self._forget(ticket)
            ticket.error = error_from_wire(msg["e"])
            ticket.notify(ticket)

    # -- roles ----------------------------------------------------------------------------

    def become(
        self,
        role: Role,
        *,
        epoch: str | None = None,
        slots: Mapping[str, Mapping[str, Message]] | None = None,
    ) -> None:
        """Take `role` (again, for a new epoch). Leading starts from `slots`, the other
        processes' records (process -> try id -> {"w": url, "f": fields})."""
        self.dispatcher.reset()
        for worker in self.pool.workers:
            worker.capacity = None
        self.role, self.epoch = role, epoch
        self.view = None  # a follower reads the new dispatcher's at its next heartbeat
        now = self.pool.clock()
        running = {
            tid: (t.worker.url, wire_fields(t, now))
            for tid, t in self.tries.items()
            if t.worker is not None
        }
        waiting = [  # sent again with their clock fields (deadlines) as of now
            {**self.sent[tid], "f": wire_fields(t, now)}
            for tid, t in self.tries.items()
            if t.worker is None
        ]
        if role == "follower":
            self.out(("slots", {tid: {"w": url, "f": f} for tid, (url, f) in running.items()}))
            self.out(("inbox", {"op": "sync", "r": self.me, "run": running, "wait": waiting}))
            return
        if role == "leader":  # its own records: what it runs now, none left from before
            self.out(("slots", {tid: {"w": url, "f": f} for tid, (url, f) in running.items()}))
        if role == "alone":
            set_shares(self.pool, self.peers, self.me)
        for process, records in (slots or {}).items():
            if process != self.me:  # this process's own word is `tries`, not its records
                for tid, record in records.items():
                    self.dispatcher.hold(process, tid, record["w"], record["f"])
        for tid, (url, fields) in running.items():
            self.dispatcher.hold(self.me, tid, url, fields)
        if role == "leader":
            # The processes of the last two heartbeats: after a Redis restart the first
            # lists only those that have heartbeated again, not all that hold slots.
            self.dispatcher.gather(p for p in self.peers if p != self.me)
        self.dispatcher.handle(waiting)

    def members(self, live: Iterable[str], *, asked_at: float | None = None) -> None:
        """The processes alive now (heartbeats): a dispatcher forgets the others, but
        not one heard from since `asked_at` (when the list was asked for): it joined
        after that, and is alive."""
        before, self.live = set(self.live), sorted(live)
        # For a share: those of the last two heartbeats, so that the first one after a
        # Redis restart (few have heartbeated yet) does not inflate it.
        self.peers = sorted(before | set(self.live))
        if self.role == "leader":
            if self.dispatcher.expecting:
                self.dispatcher.settle(self.peers)
            heard = self.dispatcher.heard
            for process in self.dispatcher.processes() - set(self.live) - {self.me}:
                if asked_at is None or heard.get(process, -math.inf) < asked_at:
                    self.dispatcher.forget(process)

    def detach(self) -> None:
        self.dispatcher.reset()
        for worker in self.pool.workers:
            worker.capacity = None
        if self.pool.relay is self:
            self.pool.relay = None

    # -- plumbing -------------------------------------------------------------------------

    def _to_dispatcher(self, msg: Message) -> None:
        if self.role == "follower":
            self.out(("inbox", msg))
        else:
            self.dispatcher.handle([msg])

    def _send(self, process: str, msg: Message) -> None:
        if process == self.me:
            self.received(msg)
        elif self.role == "leader":
            self.out(("reply", process, {**msg, "ep": self.epoch}))

    def _record(self, process: str, tid: str, record: Message | None) -> None:
        if self.role == "leader":
            self.out(("slot", process, tid, record))

    def _forget(self, ticket: Ticket) -> None:
        tid = self.ids.pop(ticket)
        del self.tries[tid]
        self.sent.pop(tid, None)


# -- the Redis driver ---------------------------------------------------------------------

# One round trip per heartbeat: liveness, the election and its renewal. Redis's own
# clock, so that processes with skewed clocks agree on who is alive.
# KEYS: members, leader, epoch, my slot records. ARGV: me, lease ms, "1" if I lead now,
# a fresh epoch token (used if I take over). Returns leader, epoch, fresh (1 when I was
# not a member: a dispatcher may have forgotten me), the members.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local fresh = redis.call('ZADD', KEYS[1], now + math.floor(lease * 2 / 3), ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease * 3)
redis.call('PEXPIRE', KEYS[4], lease * 3)
local leader = redis.call('GET', KEYS[2])
if not leader then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', lease)
  redis.call('SET', KEYS[3], ARGV[4])
  leader = ARGV[1]
elseif leader == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], lease)
  if ARGV[3] ~= '1' then redis.call('SET', KEYS[3], ARGV[4]) end
end
return {leader, redis.call('GET', KEYS[3]) or '', fresh, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""

# Leaving: hand the election over at once (if still mine) and leave the members.
LEAVE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 0
"""

RedisClient = Redis | RedisCluster


class Keys:
    def __init__(self, pool: str) -> None:
        tag = "{gw:" + pool + "}"
        self.leader, self.epoch, self.members = f"{tag}:leader", f"{tag}:epoch", f"{tag}:members"
        self.inbox, self.warm, self._tag = f"{tag}:inbox", f"{tag}:warm", tag
        self.view = f"{tag}:view"

    def to(self, process: str) -> str:
        return f"{self._tag}:to:{process}"

    def slots(self, process: str) -> str:
        return f"{self._tag}:slots:{process}"


class Observer(Protocol):
    """What the links report (gateway.metrics.CoordinationMetrics, for Prometheus)."""

    def role(self, pool: str, role: str) -> None: ...
    def fallback(self, pool: str) -> None: ...


class _Unobserved:
    def role(self, pool: str, role: str) -> None:
        pass

    def fallback(self, pool: str) -> None:
        pass


class PoolLink:
    """One pool's member on Redis: heartbeats (by `Coordination`), the reader of the
    inbox (leading) or of this process's reply list (following), and the writer."""

    def __init__(
        self,
        pool: Pool,
        *,
        me: str,
        client: RedisClient,
        blocking: RedisClient,
        lease_s: float,
        observer: Observer,
    ) -> None:
        self.pool, self.me, self.keys = pool, me, Keys(pool.name)
        self.client, self.blocking = client, blocking
        self.lease_ms = max(1, round(lease_s * 1000))
        self.observer = observer
        self.ops: list[Op] = []
        self._wake = asyncio.Event()
        self.member = Member(pool, me=me, out=self._out)
        self._heartbeat = client.register_script(HEARTBEAT_LUA)
        self._leave = client.register_script(LEAVE_LUA)
        self._lost_at: float | None = None
        self._blmpop = True  # until the server says it has no BLMPOP
        self.observer.role(pool.name, "alone")

    # -- heartbeat and roles ------------------------------------------------------------

    async def beat(self) -> None:
        member, keys = self.member, self.keys
        leading = "1" if member.role == "leader" else "0"
        asked_at = self.pool.clock()
        try:
            leader, epoch, fresh, live = await self._heartbeat(
                keys=[keys.members, keys.leader, keys.epoch, keys.slots(self.me)],
                args=[self.me, self.lease_ms, leading, secrets.token_hex(6)],
            )
            leader, epoch = _text(leader), _text(epoch)
            # Before a takeover, which reads them.
            member.members([_text(p) for p in live], asked_at=asked_at)
            if leader == self.me:
                if member.role != "leader" or epoch != member.epoch:
                    slots = await self._slot_records(member.live)
                    await self._warm_from_copy()
                    self._take("leader", epoch, slots)
                else:
                    member.dispatcher.settle()  # a heartbeat's wait is long enough
                    await self._copy_warm()
                await self._copy_view()
            else:
                if member.role != "follower" or epoch != member.epoch or fresh:
                    self._take("follower", epoch, None)
                await self._read_view()
        except REDIS_ERRORS as exc:
            _reraise_cancel()
            self.lost(exc)

    def _take(self, role: Role, epoch: str, slots: Slots | None) -> None:
        if self._lost_at is not None:
            log.warning(
                "coordination of pool %r: Redis answers again after %.1fs; rejoined as %s",
                self.pool.name,
                time.monotonic() - self._lost_at,
                role,
            )
            self._lost_at = None
        elif role != self.member.role:
            log.info("coordination of pool %r: this process is now %s", self.pool.name, role)
        self.ops.clear()  # written for another role or epoch: the new state replaces them
        self.member.become(role, epoch=epoch, slots=slots)
        self.observer.role(self.pool.name, role)

    def lost(self, exc: BaseException) -> None:
        """Redis failed: run alone on this process's share until it answers again."""
        if self.member.role == "alone" and self._lost_at is not None:
            return
        log.warning(
            "coordination of pool %r: Redis unreachable (%s); serving alone on this "
            "process's share of each worker (%d live processes known) until it is back",
            self.pool.name,
            type(exc).__name__,
            max(1, len(set(self.member.peers) | {self.me})),
        )
        self._lost_at = time.monotonic()
        self.observer.fallback(self.pool.name)
        self.ops.clear()
        self.member.become("alone")
        self.observer.role(self.pool.name, "alone")

    async def _slot_records(self, live: list[str]) -> dict[str, dict[str, Message]]:
        others = [p for p in live if p != self.me]
        if not others:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for process in others:
            pipe.hgetall(self.keys.slots(process))
        found = await pipe.execute()
        return {
            process: {_text(k): json.loads(v) for k, v in records.items()}
            for process, records in zip(others, found, strict=True)
        }

    async def _copy_warm(self) -> None:
        warm = {w.url: json.dumps(list(w.warm)) for w in self.pool.workers}
        if warm:
            await self.client.hset(self.keys.warm, mapping=warm)  # type: ignore[arg-type]
            await self.client.pexpire(self.keys.warm, self.lease_ms * 30)

    async def _warm_from_copy(self) -> None:
        copy = await self.client.hgetall(self.keys.warm)
        for worker in self.pool.workers:
            adapters = copy.get(worker.url.encode())
            for adapter in json.loads(adapters) if adapters else ():
                worker.touch(adapter)

    async def _copy_view(self) -> None:
        """Kept for a lease: a follower that finds none (the dispatcher gone) reports
        its own view until a new one writes."""
        view = PoolView.of(self.pool).to_json()
        await self.client.set(self.keys.view, view, px=self.lease_ms)

    async def _read_view(self) -> None:
        raw = await self.client.get(self.keys.view)
        self.member.view = None if raw is None else PoolView.from_json(raw)

    # -- reading and writing ------------------------------------------------------------

    def _out(self, op: Op) -> None:
        self.ops.append(op)
        self._wake.set()

    async def read(self) -> None:
        """The inbox while leading, this process's replies while following."""
        while True:
            _reraise_cancel()
            role = self.member.role
            if role == "alone":
                await asyncio.sleep(0.05)
                continue
            key = self.keys.inbox if role == "leader" else self.keys.to(self.me)
            try:
                raw = await self._pop(key)
            except REDIS_ERRORS as exc:
                _reraise_cancel()
                self.lost(exc)
                continue
            if not raw:
                continue
            if self.member.role != role:
                await self._unread(key, role, raw)
                continue
            messages = [json.loads(one) for one in raw]
            if role == "leader":
                self.member.dispatcher.handle(messages)
                continue
            for msg in messages:
                self.member.received(msg)
            if any(m.get("ep") != self.member.epoch for m in messages):
                await self.beat()  # a new dispatcher: learn its epoch now, not at the next beat

    async def _pop(self, key: str) -> list[Any]:
        """Up to BATCH messages, waiting up to BLOCK_S for the first: one round trip
        with BLMPOP (Redis 7), else BLPOP and then LPOP for the rest."""
        if self._blmpop:
            try:
                got = await self.blocking.blmpop(BLOCK_S, 1, key, direction="LEFT", count=BATCH)
            except ResponseError:  # an older Redis: no BLMPOP
                self._blmpop = False
            else:
                return list(got[1]) if got else []
        first = await self.blocking.blpop([key], timeout=BLOCK_S)
        if not first:
            return []
        return [first[1], *(await self.client.lpop(key, BATCH) or [])]

    async def _unread(self, key: str, role: Role, raw: list[Any]) -> None:
        """Messages read for a role left meanwhile: the inbox's go back to its head for
        the next dispatcher; replies for an old epoch are void (the sync replaces them)."""
        if role == "leader" and self.member.role == "follower":
            with suppress(*REDIS_ERRORS):
                await self.client.lpush(key, *reversed(raw))

    async def write(self) -> None:
        while True:
            _reraise_cancel()
            await self._wake.wait()
            self._wake.clear()
            ops, self.ops = self.ops, []
            if not ops or self.member.role == "alone":
                continue
            pipe = self.client.pipeline(transaction=False)
            for op in ops:
                self._queue(pipe, op)
            try:
                await pipe.execute()
            except REDIS_ERRORS as exc:
                _reraise_cancel()
                self.lost(exc)

    def _queue(self, pipe: Any, op: Op) -> None:
        keys, kind = self.keys, op[0]
        if kind == "inbox":
            pipe.rpush(keys.inbox, json.dumps(op[1]))
        elif kind == "reply":
            pipe.rpush(keys.to(op[1]), json.dumps(op[2]))
            pipe.pexpire(keys.to(op[1]), self.lease_ms * 3)
        elif kind == "slot":
            _, process, tid, record = op
            if record is None:
                pipe.hdel(keys.slots(process), tid)
            else:
                pipe.hset(keys.slots(process), tid, json.dumps(record))
                pipe.pexpire(keys.slots(process), self.lease_ms * 3)
        elif kind == "slots":
            pipe.delete(keys.slots(self.me))
            if op[1]:
                records = {tid: json.dumps(r) for tid, r in op[1].items()}
                pipe.hset(keys.slots(self.me), mapping=records)
                pipe.pexpire(keys.slots(self.me), self.lease_ms * 3)

    async def leave(self) -> None:
        with suppress(*REDIS_ERRORS):
            await self._leave(keys=[self.keys.members, self.keys.leader], args=[self.me])
        self.member.detach()


def _reraise_cancel() -> None:
    """redis-py may swallow a cancellation inside a command, or turn it into its own
    error: a task being cancelled must stop, not take it for an outage and go on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _logged(job: Callable[[], Coroutine[Any, Any, None]], pool: str) -> None:
    """A link's task: a bug in it is logged and the loop starts again, so that nothing
    stops a process's coordination for good."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("coordination of pool %r: a bug; its loop starts again", pool)
            await asyncio.sleep(0.1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Coordination:
    """Every pool's link for the app's lifespan; `run` is its background task."""

    def __init__(
        self,
        balancer: Balancer,
        *,
        client: RedisClient,
        blocking: RedisClient,
        spec: CoordinationSpec,
        observer: Observer,
        me: str | None = None,
    ) -> None:
        self.balancer = balancer
        self.client, self.blocking = client, blocking
        self.spec = spec
        self.observer = observer
        self.me = me or f"{os.getpid()}-{secrets.token_hex(4)}"
        self.links: dict[str, tuple[PoolLink, list[asyncio.Task[None]]]] = {}

    def replicas(self) -> int:
        """How many processes share the workers, as the last heartbeats said."""
        return max((len(set(link.member.peers)) for link, _ in self.links.values()), default=1)

    def link(self, name: str) -> PoolLink:
        return self.links[name][0]

    async def run(self) -> None:
        try:
            while True:  # the app's lifespan ran the first beat before serving
                await asyncio.sleep(self.spec.lease_s / 3)
                await self.beat()
        finally:
            for name in list(self.links):
                await self._unlink(name)

    async def beat(self) -> None:
        """Links for the pools the balancer has now (a reload adds and removes), then a
        heartbeat for each."""
        pools = self.balancer.pools
        for name in [n for n in self.links if pools.get(n) is not self.links[n][0].pool]:
            await self._unlink(name)
        for name, pool in pools.items():
            if name not in self.links:
                self._link(pool)
        await asyncio.gather(*(link.beat() for link, _ in self.links.values()))

    def _link(self, pool: Pool) -> None:
        link = PoolLink(
            pool,
            me=self.me,
            client=self.client,
            blocking=self.blocking,
            lease_s=self.spec.lease_s,
            observer=self.observer,
        )
        tasks = [
            asyncio.create_task(_logged(link.read, pool.name)),
            asyncio.create_task(_logged(link.write, pool.name)),
        ]
        self.links[pool.name] = (link, tasks)

    async def _unlink(self, name: str) -> None:
        link, tasks = self.links.pop(name)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await link.leave()


@asynccontextmanager
async def open_coordination(
    registry: Registry, balancer: Balancer, *, observer: Observer | None = None
) -> AsyncIterator[Coordination | None]:
    """The process's coordination for the app's lifespan, or None when it is off (no
    Redis, or `coordination.enabled: false`): then nothing changes and nothing runs."""
    found = registry.coordination_redis()
    if found is None:
        yield None
        return
    url, cluster = found
    spec = registry.coordination
    timeout_s = spec.timeout_ms / 1000
    client = _client(url, cluster, timeout_s)
    blocking = _client(url, cluster, BLOCK_S + timeout_s)
    log.info("pools coordinated with other processes through Redis at %s", redis_where(url))
    try:
        observer = observer or _Unobserved()
        yield Coordination(balancer, client=client, blocking=blocking, spec=spec, observer=observer)
    finally:
        await client.aclose()
        await blocking.aclose()


def _client(url: str, cluster: bool, timeout_s: float) -> RedisClient:
    # One retry, at once: a pooled connection that a Redis restart broke fails once and
    # reconnects. Past that a failed call means "run alone now", and the heartbeat
    # tries again every lease_s/3.
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1),
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)


# -- in memory: the same members without Redis ------------------------------------------


def shared_view(pool: Pool) -> PoolView | None:
    """The dispatcher's view of `pool` when this process follows it; None when this
    process's own view is the pool's (it leads, serves alone, or is not coordinated)."""
    relay = pool.relay
    if isinstance(relay, Member) and relay.role == "follower":
        return relay.view
    return None


class MemoryHub:
    """The Redis driver's part in memory, for simulations and tests: members of one
    pool, an election by call, and every message through `deliver(action)` (a
    simulation runs it after a modelled Redis hop; by default it runs at once)."""

    def __init__(self, deliver: Callable[[Callable[[], None]], object] = lambda act: act()) -> None:
        self.deliver = deliver
        self.members: dict[str, Member] = {}
        self.leader: str | None = None
        self.records: dict[str, dict[str, Message]] = {}  # the slot records
        self._epochs = 0

    def join(self, pool: Pool, me: str) -> Member:
        member = Member(pool, me=me, out=lambda op: self._out(me, op))
        self.members[me] = member
        member.live = sorted(self.members)
        return member

    def elect(self, me: str) -> None:
        """`me` leads from now on, in a new epoch; every other member follows."""
        self._epochs += 1
        epoch, self.leader = str(self._epochs), me
        self.members[me].become("leader", epoch=epoch, slots=self.records)
        for name, member in self.members.items():
            if name != me:
                member.become("follower", epoch=epoch)
        self.heartbeat()

    def kill(self, me: str) -> None:
        """`me` is gone without a word (SIGKILL); its heartbeats stop."""
        self.members.pop(me).out = lambda op: None
        self.records.pop(me, None)
        if self.leader == me:
            self.leader = None

    def heartbeat(self) -> None:
        live = sorted(self.members)
        for member in self.members.values():
            member.members(live)

    def _out(self, sender: str, op: Op) -> None:
        kind = op[0]
        if kind == "inbox":
            self.deliver(lambda: self._to_leader(op[1]))
        elif kind == "reply":
            self.deliver(lambda: self._to(op[1], op[2]))
        elif kind == "slot":
            _, process, tid, record = op
            if record is None:
                self.records.get(process, {}).pop(tid, None)
            else:
                self.records.setdefault(process, {})[tid] = record
        elif kind == "slots":
            self.records[sender] = dict(op[1])

    def _to_leader(self, msg: Message) -> None:
        leader = self.members.get(self.leader or "")
        if leader is not None and leader.role == "leader" and msg["r"] in self.members:
            leader.dispatcher.handle([msg])

    def _to(self, process: str, msg: Message) -> None:
        member = self.members.get(process)
        if member is not None and member.role == "follower":
            member.received(msg)
