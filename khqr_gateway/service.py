"""The running service: connections, schedules, Bakong, the ticks; started and stopped once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
from aiohttp import web

from khqr_gateway import times
from khqr_gateway.apps.keys import KeyCache, SigningKeys
from khqr_gateway.bakong.client import BakongClient, SourceInfo
from khqr_gateway.bakong.sandbox import make_token
from khqr_gateway.config import Settings
from khqr_gateway.credentials.renewal import SANDBOX_TOKEN_EMAIL, Credentials
from khqr_gateway.deliveries import store as delivery_store
from khqr_gateway.deliveries.deliverer import Deliverer
from khqr_gateway.deliveries.lanes import Lanes
from khqr_gateway.deliveries.sender import KEEPALIVE_S, MAX_IN_FLIGHT, Sender
from khqr_gateway.deliveries.ssrf import AddressPolicy, GuardedConnector
from khqr_gateway.infra import db, idempotency, keyset
from khqr_gateway.infra.broadcast import Broadcast
from khqr_gateway.infra.keys import keys
from khqr_gateway.infra.locks import Locks
from khqr_gateway.infra.peaks import HourlyPeaks
from khqr_gateway.infra.ratelimit import PerSecond, RateLimit
from khqr_gateway.infra.schedule import RedisClient, Schedule, connect
from khqr_gateway.infra.scheduler import Ticks
from khqr_gateway.metrics import PENDING, POLL_LAG, QUEUE_DEPTH
from khqr_gateway.notices.alerts import Alerts
from khqr_gateway.notices.telegram import BotApi, Notifier
from khqr_gateway.transactions import counts
from khqr_gateway.transactions import store as tx_store
from khqr_gateway.transactions.events import Change, EventHub
from khqr_gateway.transactions.ingest import Ingest
from khqr_gateway.transactions.late import LateWatch
from khqr_gateway.transactions.model import Status
from khqr_gateway.transactions.poller import Poller
from khqr_gateway.transactions.retention import Retention

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 10.0
TOKEN_INTERVAL_S = 60.0
RECONCILE_PAGE = 5000
# A run of the retention tick works for at most RUN_BUDGET_S; with work left, the next comes
# soon after.
RETENTION_INTERVAL_S = 10.0
# When keys were last used reaches Postgres this often: a request never writes it.
KEYS_INTERVAL_S = 10.0
# /metrics and /api/v1/stats show figures at most this old (plus one read): a scrape or a
# stats call costs no query, so however many come they cannot take the database pool.
FIGURES_INTERVAL_S = 2.0
TELEGRAM_INTERVAL_S = 0.5
ALERTS_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class Figures:
    """Counts and queue figures from Postgres and Redis, as the figures tick last read them."""

    transactions: dict[str, int]
    deliveries: dict[str, int]
    queues: dict[str, int]
    poll_lag_s: float
    oldest_pending_s: float | None
    late_payments: dict[str, int]
    read_at: datetime
    # Each app's own counts, and how long its oldest pending transaction has waited.
    by_app: dict[str, counts.Counts] = field(default_factory=dict)
    oldest_by_app: dict[str, float] = field(default_factory=dict)

    def of(self, app_id: str) -> tuple[counts.Counts, float | None]:
        """One app's counts and its oldest pending transaction's wait."""
        return self.by_app.get(app_id) or counts.empty(), self.oldest_by_app.get(app_id)


@dataclass
class Service:
    """Everything one gateway process runs, built from settings."""

    settings: Settings
    pool: asyncpg.Pool
    redis: RedisClient
    bakong: BakongClient
    credentials: Credentials
    polls: Schedule
    lanes: Lanes
    poller: Poller
    late: LateWatch
    deliverer: Deliverer
    events: EventHub
    ingest: Ingest
    retention: Retention
    api_requests: PerSecond
    keys: KeyCache
    signing: SigningKeys
    app_changes: Broadcast
    lag_peaks: HourlyPeaks
    ticks: Ticks = field(default_factory=Ticks)
    started_at: float = field(default_factory=time.time)
    figures: Figures | None = None  # None until the figures tick first ran
    bot: BotApi | None = None  # None without TELEGRAM_BOT_TOKEN
    notifier: Notifier | None = None
    alerts: Alerts | None = None  # None without TELEGRAM_ALERT_CHAT_ID

    @classmethod
    async def create(
        cls, settings: Settings, *, database_url: str, redis_url: str, bakong_url: str
    ) -> Service:
        pool = await db.create_pool(database_url)
        try:
            await db.migrate_database(database_url)
        except BaseException:
            await pool.close()
            raise
        redis = await connect(redis_url, cluster=settings.redis_cluster)
        names = keys(settings.redis_namespace)
        bakong = BakongClient(
            bakong_url, timeout_s=settings.bakong_timeout_s, proxy_url=settings.bakong_proxy_url
        )
        credentials = Credentials(
            pool,
            bakong,
            Locks(redis, names["bakong_renew"]),
            renew_before_days=settings.bakong_renew_before_days,
        )
        limits = RateLimit(
            redis,
            bucket_key=names["bakong_rate"],
            pause_prefix=names["bakong_pause"],
            rate=settings.bakong_max_rps,
        )
        polls = Schedule(redis, names["poll"])
        lanes = Lanes(redis, names)
        signing = SigningKeys(pool, settings.webhook_secrets, overlap_s=settings.secret_overlap_s)
        keys_cache = KeyCache(pool)
        events = EventHub(redis, names["events"])
        poller = Poller(
            pool=pool,
            schedule=polls,
            lanes=lanes,
            bakong=bakong,
            credentials=credentials,
            interval_s=settings.poll_interval_s,
            grace_s=settings.bakong_grace_s,
            events=events,
            limits=limits,
            tick_s=poll_tick_s(settings),
            window=settings.late_window,
        )
        late = LateWatch(
            pool=pool,
            schedule=Schedule(redis, names["late"]),
            polls=polls,
            lanes=lanes,
            checker=poller.checker,
            window=settings.late_window,
            poll_interval_s=settings.poll_interval_s,
            grace_s=settings.bakong_grace_s,
            events=events,
        )
        poller.on_timeouts = late.watch
        service = cls(
            settings=settings,
            pool=pool,
            redis=redis,
            bakong=bakong,
            credentials=credentials,
            polls=polls,
            lanes=lanes,
            poller=poller,
            late=late,
            deliverer=deliverer_for(settings, pool, lanes, signing),
            events=events,
            ingest=Ingest(pool, polls, interval_s=settings.poll_interval_s),
            retention=Retention(
                pool, days=settings.retention_days, body_days=settings.attempt_body_days
            ),
            api_requests=PerSecond(redis, names["api_rate"]),
            keys=keys_cache,
            signing=signing,
            app_changes=Broadcast(
                redis,
                names["apps"],
                what="app keys",
                # A message, or a re-connection (one may have been missed): read apps anew.
                on_message=lambda _: _forget(keys_cache, signing),
                on_connect=lambda _: _forget(keys_cache, signing),
            ),
            lag_peaks=HourlyPeaks(redis, names["lag_peaks"]),
        )
        if settings.telegram_bot_token:
            service.bot = BotApi(settings.telegram_api_url, settings.telegram_bot_token)
        service.notifier = notifier_for(settings, pool, service.bot)
        service.alerts = alerts_for(service, service.bot)
        service.poller.on_deliveries = service.deliverer.kick
        service.late.on_deliveries = service.deliverer.kick
        await service._setup_credentials()
        return service

    async def _setup_credentials(self) -> None:
        s = self.settings
        if s.sandbox:
            await self.credentials.setup_default(
                make_token(SANDBOX_TOKEN_EMAIL), SANDBOX_TOKEN_EMAIL
            )
        else:
            await self.credentials.setup_default(s.bakong_token, s.bakong_email)

    def start_ticks(self) -> None:
        self.ticks.add("poll", poll_tick_s(self.settings), self.poller.tick)
        self.ticks.add("late", late_tick_s(self.settings), self.late.tick)
        self.ticks.add("deliver", 0.1, self.deliverer.tick)
        self.ticks.add("reconcile", RECONCILE_INTERVAL_S, self.reconcile)
        self.ticks.add("token", TOKEN_INTERVAL_S, self.credentials.tick)
        self.ticks.add("figures", FIGURES_INTERVAL_S, self.refresh_figures)
        if self.notifier is not None:
            self.ticks.add("telegram", TELEGRAM_INTERVAL_S, self.notifier.tick)
        if self.alerts is not None:
            self.ticks.add("alerts", ALERTS_INTERVAL_S, self.alerts.tick)
        self.ticks.add("retention", RETENTION_INTERVAL_S, self.retention.tick)
        self.ticks.add("keys", KEYS_INTERVAL_S, self.keys.flush_used)
        self.app_changes.start()
        self.ticks.start()

    async def stop(self) -> None:
        """Stop claiming, let in-flight deliveries finish within the grace, close pools."""
        grace = self.settings.shutdown_grace_s
        await self.ticks.stop(grace)
        await self.poller.hand_back()
        await self.deliverer.drain(grace)
        await self.deliverer.close()
        if self.notifier is not None:
            await self.notifier.close()
        if self.bot is not None:
            await self.bot.close()
        await self.bakong.close()
        await self.events.stop()
        await self.app_changes.stop()
        await self.api_requests.close()
        await self.redis.aclose()
        await self.pool.close()

    async def apps_changed(self) -> None:
        """An app's keys, secrets or settings changed: this process reads them anew now, the
        others once they hear it (or their caches expire, within 5 s, if Redis is away)."""
        _forget(self.keys, self.signing)
        try:
            await self.app_changes.publish([b"changed"])
        except Exception as exc:
            log.warning("could not tell the other processes that an app changed: %s", exc)

    async def after_cancel(self, job_id: UUID, reason: str | None) -> None:
        """What a cancel sets going: no more polls, a late watch (the QR can still be paid:
        a payment made after the cancel is reported all the same), live streams told."""
        try:
            await self.polls.remove([str(job_id)])
        except Exception as exc:  # the poll tick drops it anyway: it is no longer pending
            log.warning("could not unschedule a cancelled transaction: %s", exc)
        await self.late.watch([str(job_id)])
        await self.events.publish([Change(job_id, Status.CANCELLED, reason)])

    # What the API shows of the parts, asked here so that handlers know none of them.

    @property
    def ticking(self) -> bool:
        """The ticks run, and none is overdue."""
        return self.ticks.running and not self.ticks.health.stale()

    def tick_errors(self) -> dict[str, str]:
        """The last error of each tick that has failed."""
        return dict(self.ticks.health.last_error)

    def bakong_circuits(self) -> dict[str, str]:
        """The state of each credential's Bakong breaker that is not closed."""
        return self.poller.checker.circuits()

    def check_modes(self) -> dict[str, Any]:
        """How this process checks md5s: by list or one call each, and its budget."""
        return self.poller.checker.modes()

    def bakong_calls(self) -> dict[str, Any]:
        """The outcomes of the recent Bakong calls."""
        return self.bakong.recent.summary()

    def bakong_refused_s(self) -> float | None:
        """For how long Bakong has answered 403 to every call, once that has lasted."""
        return self.bakong.refusals.blocked_for(time.monotonic())

    async def deeplink(self, credential_id: int | None, qr: str, source: SourceInfo) -> str | None:
        """Bakong's deep link for `qr`, or None (a QR works without one)."""
        return await self.poller.checker.deeplink(credential_id, qr, source)

    @property
    def in_flight_deliveries(self) -> int:
        """Webhook attempts this process is sending now."""
        return self.deliverer.in_flight

    async def refresh_figures(self) -> None:
        """The figures tick: read what /metrics and /api/v1/stats show, once for all asking."""
        lanes = await self.lanes.sizes()
        queues = {
            "poll": await self.polls.size(),
            **{lane.value: size for lane, size in lanes.items()},
            "late": await self.late.schedule.size(),
        }
        oldest_due_ms = await self.polls.oldest_due_ms()
        now = datetime.now(UTC)
        lag_ms = max(0, times.to_ms(now) - oldest_due_ms) if oldest_due_ms is not None else 0
        await self.lag_peaks.record(times.to_ms(now), lag_ms)
        # Kept by triggers (exact, not pg_class estimates: a test or an operator comparing
        # stats with what they made expects the very number), so no table is counted.
        by_app = await counts.fold_and_read(self.pool)
        by_kind = counts.total(by_app)
        # The gateway's oldest pending transaction is the oldest of every app's.
        oldest_by_app = await tx_store.oldest_pending_by_app(self.pool)
        figures = Figures(
            transactions=by_kind["transactions"],
            deliveries=by_kind["deliveries"],
            queues=queues,
            poll_lag_s=round(lag_ms / 1000, 3),
            oldest_pending_s=max(oldest_by_app.values(), default=None),
            late_payments=by_kind["late"],
            read_at=now,
            by_app=by_app,
            oldest_by_app=oldest_by_app,
        )
        self.figures = figures
        _export(figures)

    async def reconcile(self) -> None:
        """Put back in Redis whatever Postgres says is pending and Redis lost."""
        await self._reconcile_polls()
        await self._reconcile_late()
        await self._reconcile_deliveries()
        await idempotency.expire_idempotency_keys(self.pool)

    async def _reconcile_polls(self) -> None:
        now_ms = times.now_ms()
        pending = keyset.pages(
            lambda after: tx_store.pending_ids(self.pool, after=after, limit=RECONCILE_PAGE),
            key=lambda row: row.id,
        )
        async for rows in pending:
            due = [(str(r.id), min(now_ms, times.to_ms(r.at))) for r in rows]
            if added := await self.polls.add_missing(due):
                log.warning("reconcile: %d pending transactions rescheduled", added)

    async def _reconcile_late(self) -> None:
        now_ms = times.now_ms()
        watched = keyset.pages(
            lambda after: tx_store.late_watch_page(self.pool, after=after, limit=RECONCILE_PAGE),
            key=lambda row: (row.at, row.id),
        )
        async for rows in watched:
            if added := await self.late.schedule.add_missing([(str(r.id), now_ms) for r in rows]):
                log.warning("reconcile: %d late watches rescheduled", added)

    async def _reconcile_deliveries(self) -> None:
        pending = keyset.pages(
            lambda after: delivery_store.pending_page(self.pool, after=after, limit=RECONCILE_PAGE),
            key=lambda row: row.id,
        )
        async for rows in pending:
            if added := await self.lanes.restore(rows):
                log.warning("reconcile: %d pending deliveries rescheduled", added)


SERVICE_KEY = web.AppKey("service", Service)


def _forget(keys: KeyCache, signing: SigningKeys) -> None:
    keys.forget()
    signing.forget()


def deliverer_for(
    settings: Settings, pool: asyncpg.Pool, lanes: Lanes, signing: SigningKeys | None = None
) -> Deliverer:
    """The delivery tick, sending through the SSRF guard that settings ask for, each webhook
    signed with its app's secrets."""
    policy = AddressPolicy.for_settings(settings)
    sender = Sender(
        secrets=settings.webhook_secrets,
        timeout_s=settings.webhook_timeout_s,
        connector_factory=lambda: GuardedConnector(
            policy, limit=MAX_IN_FLIGHT, keepalive_timeout=KEEPALIVE_S
        ),
        secrets_of=signing.of if signing is not None else None,
    )
    return Deliverer(
        pool=pool, lanes=lanes, sender=sender, retry_schedule=settings.webhook_retry_schedule
    )


def notifier_for(settings: Settings, pool: asyncpg.Pool, bot: BotApi | None) -> Notifier:
    """The Telegram lane: the default app's when it has a bot and a chat, every other app's
    that has them."""
    return Notifier(
        pool=pool,
        bot=bot if settings.telegram_chat_id else None,
        chat_id=settings.telegram_chat_id,
        language=settings.telegram_language,
        retry_schedule=settings.webhook_retry_schedule,
        api_url=settings.telegram_api_url,
    )


def alerts_for(service: Service, bot: BotApi | None) -> Alerts | None:
    """Operator alerts, when TELEGRAM_ALERT_CHAT_ID names where to send them."""
    chat_id = service.settings.telegram_alert_chat_id
    if bot is None or not chat_id:
        return None
    return Alerts(
        pool=service.pool,
        recent=service.bakong.recent,
        send=lambda text: bot.sent(chat_id, text),
    )


def poll_tick_s(settings: Settings) -> float:
    """How often the poll tick runs: often enough that a check is never a tick late."""
    return min(0.1, settings.poll_interval_s / 4)


def late_tick_s(settings: Settings) -> float:
    """How often the late tick runs: its checks are slow (30 s), a second late is nothing."""
    return min(1.0, settings.late_check_interval_s / 4)


def _export(figures: Figures) -> None:
    for name, depth in figures.queues.items():
        QUEUE_DEPTH.labels(name).set(depth)
    POLL_LAG.set(figures.poll_lag_s)
    PENDING.set(figures.transactions.get("pending", 0))


def _ms(value: datetime | None) -> int:
    return times.to_ms(value) if value is not None else times.now_ms()
