"""A real IMAP server for tests: Debian's dovecot (dovecot-imapd), started on a free loopback port with its
own configuration directory and a passwd-file user, never the system service. `./dev test` installs it."""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

USER = "bounces"
PASSWORD = "imap-test-password-42"


@dataclass
class Dovecot:
    port: int
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def url(self) -> str:
        return f"imap://{USER}:{PASSWORD}@127.0.0.1:{self.port}/INBOX"

    def client(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.login(USER, PASSWORD)
        client.select("INBOX")
        return client

    def append(self, raw: bytes) -> None:
        """Deliver a message into the mailbox, as the MTA would."""
        client = self.client()
        try:
            status, _ = client.append("INBOX", None, None, raw)
            assert status == "OK"
        finally:
            client.logout()

    def subjects(self) -> list[str]:
        client = self.client()
        try:
            _, data = client.uid("SEARCH", None, "ALL")  # type: ignore[arg-type]
            subjects = []
            for uid in (data[0] or b"").split():
                _, items = client.uid("FETCH", uid.decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                header = next(item[1] for item in items if isinstance(item, tuple))
                subjects.append(header.decode().partition(":")[2].strip())
            return sorted(subjects)
        finally:
            client.logout()

    def clear(self) -> None:
        client = self.client()
        try:
            client.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
            client.expunge()
        except imaplib.IMAP4.error:
            pass  # An empty mailbox has no 1:*.
        finally:
            client.logout()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start(root: Path) -> Dovecot:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not os.path.exists(binary):
        raise RuntimeError("dovecot is not installed: run ./dev test, which installs Debian's dovecot-imapd")
    port = free_port()
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # Dovecot refuses to run its login and mail processes as root: use the users its package creates.
        internal, login = "dovecot", "dovenull"
        mail_user = pwd.getpwnam("dovecot")
        os.chown(root / "mail", mail_user.pw_uid, mail_user.pw_gid)
    else:
        internal = login = pwd.getpwuid(os.getuid()).pw_name
        mail_user = pwd.getpwuid(os.getuid())
    (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    (root / "dovecot.conf").write_text(f"""
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailer-test-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# The test of a wrong password need not wait out the delay that slows down guessing.
auth_failure_delay = 0
log_path = {root}/dovecot.log
first_valid_uid = {min(mail_user.pw_uid, 1)}
mail_location = maildir:{root}/mail/%u
default_internal_user = {internal}
default_login_user = {login}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_user.pw_uid} gid={mail_user.pw_gid} home={root}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
""")
    # Dovecot writes to its log_path; stderr only holds start-up errors, read below if it fails.
    errors = (root / "stderr.log").open("wb")
    process = subprocess.Popen([binary, "-F", "-c", str(root / "dovecot.conf")], stdout=subprocess.DEVNULL,
                               stderr=errors)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(100).startswith(b"* OK"):
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log = (root / "dovecot.log").read_text() if (root / "dovecot.log").exists() else ""
            process.kill()
            raise RuntimeError(f"dovecot did not start: {(root / 'stderr.log').read_text()} {log}")
        time.sleep(0.1)
    return Dovecot(port, process, root)
