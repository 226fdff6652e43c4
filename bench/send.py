"""End-to-end sending throughput against Postfix's smtp-sink, with the raw client ceiling in the same run.

    .venv/bin/python bench/send.py                       # 100k readers, 2 Celery workers, PostgreSQL + Redis
    .venv/bin/python bench/send.py --readers 1000000     # the memory check at 1M
    .venv/bin/python bench/send.py --sizes 100000,1000000

For each size it prints: messages per second end to end (campaign start to finish, through real
`celery -A worker worker` processes); the raw ceiling (the same SmtpTransport pushing one pre-built
message from 2 processes); their ratio; client CPU per message; peak RSS per worker. It starts and
stops its own smtp-sink, PostgreSQL database and Redis queue (database 13).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("MAILER_BENCH_PG", "postgresql://127.0.0.1:5432/test")
BROKER = os.environ.get("MAILER_BENCH_REDIS", "redis://127.0.0.1:6379/13")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def article_html(count: int = 20) -> str:
    """About 20 KB of HTML: a petition and a list of articles, as a news site would send."""
    items = []
    for i in range(count):
        items.append(
            f"<tr><td style='padding:8px 0'><a href='https://truthandresistance.example/articles/{i}'>"
            f"Diplomacy watch {i}: envoys meet again as talks on a ceasefire resume</a><br>"
            f"<small>falmouthpacket.co.uk · Friday, August 15, 2025</small><p>Leaders met for a second round "
            f"of talks; observers called it a first step towards serious negotiations, while others urged "
            f"caution and asked for guarantees before any agreement. Item {i}.</p></td></tr>"
        )
    return ("<h1>Sign our petition: talks, not tanks</h1><p>Dear {{ name or 'reader' }},</p>"
            "<p>This week's reading, and one thing you can do.</p><table>" + "".join(items) + "</table>"
            "<p><a href='https://truthandresistance.example/petition'>Sign the petition</a></p>")


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(binary).exists():
            raise SystemExit("smtp-sink is missing: install Debian's postfix package "
                             "(apt-get install postfix) and run the benchmark again.")
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen([binary, *user, "-c", f"127.0.0.1:{self.port}", "1000"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start (install Debian's postfix package)")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def create_database() -> tuple[str, str]:
    import psycopg

    name = f"mailer_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load_readers(url: str, count: int) -> None:
    """COPY the readers in: 1M rows in well under a minute."""
    import hashlib

    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain) as conn, conn.cursor() as cur:
        with cur.copy("COPY subscribers (email, email_key, email_hash, name, frequency, status, created_at, "
                      "updated_at, confirmed_at) FROM STDIN") as copy:
            buffer = io.StringIO()
            for i in range(count):
                email = f"reader{i}@bench{i % 97}.example"
                name = f"Reader {i}" if i % 5 else ""
                digest = hashlib.sha256(email.encode()).hexdigest()
                buffer.write(f"{email}\t{email}\t{digest}\t{name}\tdaily\tconfirmed\tnow()\tnow()\tnow()\n")
                if i % 50_000 == 49_999:
                    copy.write(buffer.getvalue().replace("now()", "2026-11-25 00:00:00"))
                    buffer = io.StringIO()
            copy.write(buffer.getvalue().replace("now()", "2026-11-25 00:00:00"))
        cur.execute("ANALYZE subscribers")


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and peak RSS in KiB of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cpu, peak


def start_workers(env: dict[str, str], count: int, logs: list[Path] | None = None) -> list[subprocess.Popen[bytes]]:
    """Real `celery -A worker worker` processes, one task at a time each, as in production. With `logs`,
    each worker's log goes to its file (at INFO) instead of nowhere."""
    processes = []
    for i in range(count):
        log = logs[i].open("wb") if logs else subprocess.DEVNULL
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool=solo",
             "--loglevel=INFO" if logs else "--loglevel=WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env={**os.environ, **env, **({"MAILER_LOG_LEVEL": "INFO"} if logs else {})},
            stdout=log, stderr=subprocess.STDOUT if logs else subprocess.DEVNULL,
        ))
    time.sleep(4)  # Let the workers connect before the clock starts.
    return processes


def finish(campaign_id: int, processes: list[subprocess.Popen[bytes]], readers: int,
           started: float) -> tuple[Any, float, list[tuple[float, int]]]:
    """Wait for the campaign to stop (ticking as `celery -A worker beat` would), read the workers' CPU
    and peak memory, stop them, and check every reader was sent to. Returns (progress, seconds, stats)."""
    from mailer import campaigns
    from mailer.db import session_scope

    last = last_tick = time.perf_counter()
    while True:
        time.sleep(0.5)
        with session_scope() as session:
            progress = campaigns.progress(session, campaign_id)
        if progress.status != "sending":
            break
        if time.perf_counter() - last_tick > 10:
            campaigns.tick()
            last_tick = time.perf_counter()
        if time.perf_counter() - last > 10:
            print(f"    … {progress.done}/{progress.total}", flush=True)
            last = time.perf_counter()
    elapsed = time.perf_counter() - started
    stats = [proc_stats(p.pid) for p in processes]
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=30)
    if progress.status != "finished" or progress.counts["sent"] != readers:
        raise SystemExit(f"the campaign did not finish cleanly: {progress}")
    return progress, elapsed, stats


def end_to_end(env: dict[str, str], readers: int, workers: int) -> dict[str, float]:
    import redis

    redis.Redis.from_url(BROKER).flushdb()
    os.environ.update(env)
    from mailer.config import get_settings

    get_settings.cache_clear()
    from mailer import campaigns
    from mailer.db import session_scope

    with session_scope() as session:
        campaign = campaigns.create(session, subject="This week: {{ name or 'reader' }}, sign our petition",
                                    html=article_html())
        campaign_id = campaign.id
    processes = start_workers(env, workers)
    cpu_before = sum(proc_stats(p.pid)[0] for p in processes)
    started = time.perf_counter()
    with session_scope() as session:
        campaigns.start(session, campaign_id)
    campaigns.kick(campaign_id)
    progress, elapsed, stats = finish(campaign_id, processes, readers, started)
    sent = progress.counts["sent"]
    return {"rate": sent / elapsed, "cpu_per_msg_ms": (sum(s[0] for s in stats) - cpu_before) / sent * 1000,
            "peak_rss_mb": max(s[1] for s in stats) / 1024, "seconds": elapsed}


def _raw_worker(port: int, message: bytes, count: int, connections: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from mailer.sender import Envelope, SmtpTransport

    async def run() -> None:
        lanes = [SmtpTransport([f"smtp://127.0.0.1:{port}"], timeout=30) for _ in range(connections)]
        remaining = iter(range(count))

        async def lane(transport: SmtpTransport) -> None:
            # As the sending loop does: the next envelope is announced, to ride behind the current message.
            i = next(remaining, None)
            while i is not None:
                j = next(remaining, None)
                transport.announce(Envelope("newsletter@bench.example", f"r{j}@bench.example", b"")
                                   if j is not None else None)
                result = await transport.send(Envelope("newsletter@bench.example", f"r{i}@bench.example", message))
                assert result.ok, result
                i = j

        await asyncio.gather(*(lane(t) for t in lanes))
        for transport in lanes:
            await transport.close()

    started = time.process_time()
    asyncio.run(run())
    out.put(time.process_time() - started)


def raw_ceiling(port: int, message: bytes, total: int, workers: int, connections: int) -> dict[str, float]:
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    per = total // workers
    processes = [multiprocessing.Process(target=_raw_worker, args=(port, message, per, connections, out))
                 for _ in range(workers)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    elapsed = time.perf_counter() - started
    cpu = sum(out.get() for _ in processes)
    return {"rate": per * workers / elapsed, "cpu_per_msg_ms": cpu / (per * workers) * 1000}


def sample_message(env: dict[str, str]) -> bytes:
    os.environ.update(env)
    from mailer.compose import Reader
    from mailer.config import get_settings
    from mailer.db import session_scope
    from mailer.models import Campaign

    get_settings.cache_clear()
    from mailer import addresses, campaigns

    with session_scope() as session:
        campaign = session.get(Campaign, 1)
        assert campaign is not None
        variants = campaigns.message_templates(campaign)
    reader = Reader(email="r@bench.example", name="Reader", unsubscribe_url="https://news.example/unsubscribe/x" * 2,
                    preferences_url="https://news.example/preferences/x" * 2)
    # A campaign mail's own signed Message-ID, so the raw ceiling pushes a message of the real size.
    return variants.for_reader(reader).personalise(reader, message_id=addresses.message_id(1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="comma-separated reader counts (default 100000)")
    parser.add_argument("--readers", type=int, help="one reader count (overrides --sizes)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=int(os.environ.get("MAILER_SMTP_CONNECTIONS", "8")))
    parser.add_argument("--raw-runs", type=int, default=3, help="raw ceiling runs; the median is reported")
    args = parser.parse_args()
    sizes = [args.readers] if args.readers else [int(s) for s in args.sizes.split(",")]

    sink = Sink()
    results = []
    try:
        for readers in sizes:
            name, url = create_database()
            try:
                from mailer.migrate import upgrade

                upgrade(url)
                load_readers(url, readers)
                env = {"MAILER_DATABASE_URL": url, "MAILER_BROKER_URL": BROKER,
                       "MAILER_SMTP_URL": f"smtp://127.0.0.1:{sink.port}", "MAILER_SECRET_KEY": "bench-" + "k" * 20,
                       "MAILER_BASE_URL": "https://news.example", "MAILER_FROM": "News <newsletter@news.example>",
                       "MAILER_SMTP_CONNECTIONS": str(args.connections), "MAILER_BATCH_SIZE": "500",
                       "MAILER_SEND_PARALLELISM": str(args.workers), "MAILER_LOG_LEVEL": "WARNING"}
                print(f"{readers:,} readers: sending end to end with {args.workers} Celery workers…", flush=True)
                e2e = end_to_end(env, readers, args.workers)
                message = sample_message(env)
                raws = [raw_ceiling(sink.port, message, min(readers, 100_000), args.workers, args.connections)
                        for _ in range(args.raw_runs)]
                raw = {"rate": statistics.median(r["rate"] for r in raws),
                       "cpu_per_msg_ms": statistics.median(r["cpu_per_msg_ms"] for r in raws)}
                results.append((readers, e2e, raw, len(message)))
            finally:
                from mailer.db import engine_for

                engine_for(url).dispose()
                drop_database(name)
    finally:
        sink.stop()

    print()
    print(f"{'readers':>9} {'msg size':>9} {'end-to-end/s':>13} {'raw/s':>8} {'ratio':>6} "
          f"{'CPU ms/msg':>11} {'raw CPU ms':>11} {'peak RSS/worker':>16}")
    for readers, e2e, raw, size in results:
        print(f"{readers:>9,} {size / 1024:>7.1f}KB {e2e['rate']:>13,.0f} {raw['rate']:>8,.0f} "
              f"{e2e['rate'] / raw['rate']:>6.2f} {e2e['cpu_per_msg_ms']:>11.3f} {raw['cpu_per_msg_ms']:>11.3f} "
              f"{e2e['peak_rss_mb']:>13.1f} MB")
    if len(results) > 1:
        low, high = results[0][1]["peak_rss_mb"], results[-1][1]["peak_rss_mb"]
        print(f"peak memory {results[-1][0]:,} vs {results[0][0]:,} readers: {high / low:.2f}x")


if __name__ == "__main__":
    main()
