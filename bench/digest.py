"""Digest throughput: build, render and send 100k readers' category digests to smtp-sink.

    .venv/bin/python bench/digest.py                 # 100k readers, 7 categories, 2 Celery workers
    .venv/bin/python bench/digest.py --readers 20000
    .venv/bin/python bench/digest.py --build-only    # the builder alone, no workers: where its time goes

In one run it measures the sending engine's own end-to-end rate (a broadcast to the same readers,
as bench/send.py does) and then the digest run: materialisation (grouping, ledger) plus sending,
start to finish. It prints readers per second, the ratio to the broadcast rate, how many distinct
contents were rendered (each rendered once, twice with the name variant) against the readers,
and the peak memory of the digest builder and of each worker.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import send as common  # noqa: E402 - bench/send.py holds the shared sink, database and process helpers.

ARTICLES = 60


def load_mixes(url: str, readers: int) -> None:
    """Each reader's own mix: none (everything), or one to three of the categories, by their number."""
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain) as conn, conn.cursor() as cur:
        categories = [row[0] for row in cur.execute("SELECT id FROM categories ORDER BY position")]
        ids = [row[0] for row in cur.execute("SELECT id FROM subscribers ORDER BY id")]
        with cur.copy("COPY subscriber_categories (subscriber_id, category_id) FROM STDIN") as copy:
            buffer = io.StringIO()
            for n, subscriber_id in enumerate(ids):
                if n % 6 == 0:
                    continue  # chose none: wants every category
                width = 1 + n % 3
                start = (n // 3) % len(categories)
                for k in range(width):
                    buffer.write(f"{subscriber_id}\t{categories[(start + k) % len(categories)]}\n")
            copy.write(buffer.getvalue())


def add_articles(count: int) -> None:
    from mailer import articles
    from mailer.db import session_scope
    from mailer.models import Category

    with session_scope() as session:
        names = [c.name for c in session.query(Category).order_by(Category.position)]
        items = [articles.Incoming(
            url=f"https://truthandresistance.example/articles/{i}",
            title=f"Diplomacy watch {i}: envoys meet again as talks resume",
            source="falmouthpacket.co.uk",
            summary=f"<p>Leaders met for round {i}; observers called it a first step towards negotiations.</p>",
            categories=tuple(names[(i + k) % len(names)] for k in range(1 + i % 2)),
        ) for i in range(count)]
        articles.ingest(session, items)


def distinct_contents(campaign_id: int) -> int:
    from sqlalchemy import func, select

    from mailer.db import session_scope
    from mailer.models import DigestContent

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(DigestContent)
                                  .where(DigestContent.campaign_id == campaign_id)) or 0)


def renders_in(logs: list[Path]) -> int:
    """Template renders the workers made, as each one's last send-loop log line counts them."""
    total = 0
    for log in logs:
        counts = re.findall(r"this process has rendered (\d+) templates", log.read_text(errors="replace"))
        total += int(counts[-1]) if counts else 0
    return total


def digest_run(env: dict[str, str], readers: int, workers: int) -> dict[str, float]:
    import redis

    redis.Redis.from_url(common.BROKER).flushdb()
    os.environ.update(env)
    from mailer.config import get_settings

    get_settings.cache_clear()
    from mailer import digests
    from mailer.models import Frequency

    logs = [Path(tempfile.gettempdir()) / f"mailer-bench-digest-worker{i}.log" for i in range(workers)]
    processes = common.start_workers(env, workers, logs=logs)
    cpu_before = sum(common.proc_stats(p.pid)[0] for p in processes)
    started = time.perf_counter()
    result = digests.run(Frequency.daily)
    built = time.perf_counter() - started
    assert result.campaign_id is not None
    _, elapsed, stats = common.finish(result.campaign_id, processes, readers, started)
    sent = readers
    return {"rate": sent / elapsed, "build_seconds": built, "seconds": elapsed,
            "contents": distinct_contents(result.campaign_id), "renders": renders_in(logs),
            "cpu_per_msg_ms": (sum(s[0] for s in stats) - cpu_before) / sent * 1000,
            "worker_rss_mb": max(s[1] for s in stats) / 1024,
            "builder_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def build_alone(url: str, env: dict[str, str]) -> None:
    """Materialise the run with no worker sending, and print the time spent in each kind of statement."""
    from collections import Counter

    from sqlalchemy import event

    from mailer import digests
    from mailer.config import get_settings
    from mailer.db import engine_for
    from mailer.models import Frequency

    os.environ.update(env)
    get_settings.cache_clear()
    add_articles(ARTICLES)
    spent: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    clock: dict[int, float] = {}

    @event.listens_for(engine_for(url), "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        clock[id(conn)] = time.perf_counter()

    @event.listens_for(engine_for(url), "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        kind = " ".join(statement.split())[:60]
        spent[kind] += time.perf_counter() - clock.pop(id(conn))
        calls[kind] += 1

    started, cpu = time.perf_counter(), time.process_time()
    result = digests.run(Frequency.daily)
    print(f"built {result.readers:,} digests in {time.perf_counter() - started:.1f} s "
          f"({time.process_time() - cpu:.1f} s of it the builder's own CPU); statements by time:")
    for kind, seconds in spent.most_common(8):
        print(f"  {seconds:6.2f} s  {calls[kind]:4d}×  {kind}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=24)
    parser.add_argument("--build-only", action="store_true", help="time the builder alone, without sending")
    args = parser.parse_args()

    sink = common.Sink()
    name, url = common.create_database()
    try:
        from mailer.migrate import upgrade

        upgrade(url)
        common.load_readers(url, args.readers)
        load_mixes(url, args.readers)
        env = {"MAILER_DATABASE_URL": url, "MAILER_BROKER_URL": common.BROKER,
               "MAILER_SMTP_URL": f"smtp://127.0.0.1:{sink.port}", "MAILER_SECRET_KEY": "bench-" + "k" * 20,
               "MAILER_BASE_URL": "https://news.example", "MAILER_FROM": "News <newsletter@news.example>",
               "MAILER_SMTP_CONNECTIONS": str(args.connections), "MAILER_BATCH_SIZE": "500",
               "MAILER_SEND_PARALLELISM": str(args.workers), "MAILER_LOG_LEVEL": "WARNING",
               "MAILER_SCHEDULE_DIGESTS": "false",
               # The articles are committed before the run starts; no grace is needed.
               "MAILER_DIGEST_GRACE_SECONDS": "0"}
        if args.build_only:
            build_alone(url, env)
            return
        print(f"{args.readers:,} readers: the engine's own rate (a broadcast)…", flush=True)
        broadcast = common.end_to_end(env, args.readers, args.workers)
        add_articles(ARTICLES)
        print(f"{args.readers:,} readers: building and sending their digests…", flush=True)
        digest = digest_run(env, args.readers, args.workers)
    finally:
        from mailer.db import engine_for

        engine_for(url).dispose()
        common.drop_database(name)
        sink.stop()
    print()
    print(f"broadcast end to end: {broadcast['rate']:,.0f} mails/s")
    print(f"digests end to end:   {digest['rate']:,.0f} readers/s "
          f"({digest['rate'] / broadcast['rate']:.2f} of the broadcast rate; build {digest['build_seconds']:.1f} s "
          f"of {digest['seconds']:.1f} s)")
    print(f"renders: {digest['renders']:,} template renders in the workers for {args.readers:,} readers "
          f"({digest['contents']:,} distinct contents, each rendered with and without a name, once per worker)")
    print(f"CPU per digest {digest['cpu_per_msg_ms']:.3f} ms in the workers; peak RSS: builder "
          f"{digest['builder_rss_mb']:.0f} MB, worker {digest['worker_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
