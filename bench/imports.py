"""CSV import speed: N rows (default 100k) into an empty database, on SQLite and on PostgreSQL.

    .venv/bin/python bench/imports.py [--rows 100000] [--backends sqlite,postgresql]

Prints rows per second and the wall time of the whole import (parse, check, insert), a second run of
the same file (every row an update check, nothing changed), and a dry run. Target: 100k rows < 60 s.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CATEGORIES = ["foreign-policy-and-international-relations", "us-russia-relations", "us-nato-relations",
              "U.S.–China Relations", "middle-east", "europe", "economy"]


def make_csv(rows: int) -> str:
    rng = random.Random(7)
    lines = ["email,name,categories,frequency,status"]
    for i in range(rows):
        chosen = "|".join(rng.sample(CATEGORIES[:3], rng.randint(0, 2)))
        lines.append(f"reader{i}@example.org,Reader {i},{chosen},{rng.choice(['daily', 'weekly'])},confirmed")
    return "\n".join(lines) + "\n"


def run_once(url: str, content: str, *, dry_run: bool) -> tuple[float, dict[str, int]]:
    from mailer import imports
    from mailer.db import session_scope

    with session_scope() as session:
        job = imports.create_job(session, content=content, filename="bench.csv", actor="bench", dry_run=dry_run)
        job_id = job.id
    started = time.perf_counter()
    imports.run(job_id)
    elapsed = time.perf_counter() - started
    with session_scope() as session:
        return elapsed, imports.report(session, job_id).counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    content = make_csv(args.rows)
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if backend == "sqlite":
                url = f"sqlite:///{tmp}/bench.db"
            else:
                import psycopg

                name = f"bench_import_{os.getpid()}"
                with psycopg.connect("postgresql://127.0.0.1:5432/test", autocommit=True) as admin:
                    admin.execute(f"DROP DATABASE IF EXISTS {name}")
                    admin.execute(f"CREATE DATABASE {name}")
                url = f"postgresql+psycopg://127.0.0.1:5432/{name}"
            os.environ["MAILER_DATABASE_URL"] = url
            os.environ.setdefault("MAILER_SECRET_KEY", "bench-secret-key-0123456789abcdef")
            from mailer.config import get_settings
            from mailer.db import engine
            from mailer.migrate import upgrade

            get_settings.cache_clear()
            upgrade(url)
            dry, _ = run_once(url, content, dry_run=True)
            first, counts = run_once(url, content, dry_run=False)
            again, counts_again = run_once(url, content, dry_run=False)
            print(f"{backend:10} {args.rows:,} rows: dry run {dry:5.1f} s; import {first:5.1f} s "
                  f"({args.rows / first:,.0f} rows/s, added {counts['added']:,}); same file again {again:5.1f} s "
                  f"(unchanged {counts_again['unchanged']:,})")
            engine().dispose()
            if backend != "sqlite":
                with psycopg.connect("postgresql://127.0.0.1:5432/test", autocommit=True) as admin:
                    admin.execute(f"DROP DATABASE IF EXISTS {name}")


if __name__ == "__main__":
    main()
