"""Provider webhooks: Amazon SES through SNS, Postmark and SendGrid, each with its signature or credentials
checked, passing and failing. Keys and certificates are made here; SNS certificates are served on loopback."""

from __future__ import annotations

import base64
import datetime
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailer import queue
from mailer.db import session_scope
from mailer.models import InboundKind, InboundMessage, Status
from mailer.webhooks import sns_string_to_sign
from tests.conftest import subscriber_row
from tests.inbound_helpers import sent_campaign

TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-feedback"


@dataclass
class CertServer:
    """Serves the SNS signing certificate (and counts SubscribeURL visits) on a loopback port."""

    pem: bytes
    port: int = 0
    visits: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def _self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.eu-west-1.amazonaws.com")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def sns_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def cert_server(sns_key: rsa.RSAPrivateKey) -> Iterator[CertServer]:
    served = CertServer(_self_signed(sns_key))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.visits.append(self.path)
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{served.port}/moved.pem")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = served.pem if self.path.endswith(".pem") else b"<ConfirmSubscriptionResponse/>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served
    server.shutdown()


@pytest.fixture
def ses(env: Callable[..., None], cert_server: CertServer) -> CertServer:
    env(sns_topic_arns=TOPIC, sns_cert_url_prefixes=cert_server.base)
    cert_server.visits.clear()
    return cert_server


def sns_message(key: rsa.RSAPrivateKey, cert_url: str, *, message_type: str = "Notification",
                message: str = "", version: str = "1", **fields: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Type": message_type, "MessageId": fields.pop("MessageId", "6f9c2b1e-0d4a-4c8e-9a3f-2b7d5e1c0a9f"),
        "TopicArn": fields.pop("TopicArn", TOPIC), "Message": message, "Timestamp": "2026-11-25T09:14:07.123Z",
        "SignatureVersion": version, "SigningCertURL": cert_url, **fields,
    }
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()
    body["Signature"] = base64.b64encode(key.sign(sns_string_to_sign(body), padding.PKCS1v15(), digest)).decode()
    return body


def ses_bounce(email: str, return_path: str, message_id: str, *, status: str = "5.1.1",
               bounce_type: str = "Permanent") -> str:
    return json.dumps({
        "notificationType": "Bounce",
        "bounce": {"bounceType": bounce_type, "bounceSubType": "General", "feedbackId": "0102017a-b1c2",
                   "bouncedRecipients": [{"emailAddress": email, "action": "failed", "status": status,
                                          "diagnosticCode": f"smtp; 550 {status} user unknown"}],
                   "timestamp": "2026-11-25T09:14:06.000Z"},
        "mail": {"timestamp": "2026-11-25T09:14:04.000Z", "source": return_path, "messageId": "0102017a-ses",
                 "destination": [email], "commonHeaders": {"messageId": message_id,
                                                           "subject": "Petition: talks, not tanks"}},
    })


def inbound_rows() -> list[InboundMessage]:
    with session_scope() as session:
        found = list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))
        session.expunge_all()
    return found


# --- Amazon SES via SNS ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_signed_ses_bounce_bounces_its_reader(client: TestClient, ses: CertServer, sns_key: rsa.RSAPrivateKey,
                                                version: str) -> None:
    """A correctly signed SNS notification of an SES hard bounce is stored and bounces the reader."""
    [sent] = sent_campaign(1)
    body = sns_message(sns_key, ses.base + "SimpleNotificationService-01.pem", version=version,
                       message=ses_bounce(sent.email, sent.return_path, sent.message_id), Subject="Amazon SES")
    response = client.post("/webhooks/ses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == 1
    queue.drain()
    [row] = inbound_rows()
    assert (row.channel, row.kind, row.severity, row.delivery_id) == ("ses", InboundKind.bounce, "hard",
                                                                      sent.delivery_id)
    assert subscriber_row(sent.email).status is Status.bounced
    # SNS retries a notification it thinks was lost: the same MessageId stores nothing new.
    assert client.post("/webhooks/ses", json=body).json()["stored"] == 0


def test_sns_messages_that_fail_a_check_are_refused(client: TestClient, ses: CertServer,
                                                    sns_key: rsa.RSAPrivateKey) -> None:
    """A tampered message, a foreign key, an untrusted certificate URL or topic each get 403 and a sentence."""
    [sent] = sent_campaign(1)
    good = sns_message(sns_key, ses.base + "cert.pem", message=ses_bounce(sent.email, sent.return_path,
                                                                         sent.message_id))
    tampered = {**good, "Message": good["Message"].replace(sent.email, "someone@example.org")}
    answer = client.post("/webhooks/ses", json=tampered)
    assert answer.status_code == 403
    assert answer.json()["detail"] == "The SNS signature does not match the message; it was not sent by Amazon SNS."
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = sns_message(other_key, ses.base + "cert.pem", message=good["Message"])
    assert client.post("/webhooks/ses", json=forged).status_code == 403
    untrusted = sns_message(sns_key, "https://evil.example.net/cert.pem", message=good["Message"])
    answer = client.post("/webhooks/ses", json=untrusted)
    assert answer.status_code == 403
    assert "not Amazon SNS's" in answer.json()["detail"]
    foreign_topic = sns_message(sns_key, ses.base + "cert.pem", message=good["Message"],
                                TopicArn="arn:aws:sns:eu-west-1:999999999999:someone-else")
    answer = client.post("/webhooks/ses", json=foreign_topic)
    assert answer.status_code == 403
    assert "is not in MAILER_SNS_TOPIC_ARNS" in answer.json()["detail"]
    # A trusted URL that redirects elsewhere is not followed; SNS is asked to retry later.
    redirected = sns_message(sns_key, ses.base + "redirect.pem", message=good["Message"])
    answer = client.post("/webhooks/ses", json=redirected)
    assert answer.status_code == 503
    assert "/moved.pem" not in ses.visits
    assert client.post("/webhooks/ses", content=b"not json").status_code == 400
    assert inbound_rows() == []
    assert subscriber_row(sent.email).status is Status.confirmed


def test_a_subscription_confirmation_is_followed_only_when_signed(client: TestClient, ses: CertServer,
                                                                  sns_key: rsa.RSAPrivateKey) -> None:
    """A signed SubscriptionConfirmation visits its SubscribeURL once; an unsigned one visits nothing."""
    subscribe = ses.base + "?Action=ConfirmSubscription&Token=2336412f37fb687f5d51e6e2425f004aed"
    confirmation = sns_message(sns_key, ses.base + "cert.pem", message_type="SubscriptionConfirmation",
                               message="You have chosen to subscribe to the topic.", SubscribeURL=subscribe,
                               Token="2336412f37fb687f5d51e6e2425f004aed")
    unsigned = {**confirmation, "Signature": base64.b64encode(b"x" * 256).decode()}
    assert client.post("/webhooks/ses", json=unsigned).status_code == 403
    assert not any("ConfirmSubscription" in visit for visit in ses.visits)
    answer = client.post("/webhooks/ses", json=confirmation)
    assert answer.status_code == 200
    assert answer.json()["detail"] == "Subscription confirmed."
    assert [visit for visit in ses.visits if "ConfirmSubscription" in visit] == \
        ["/?Action=ConfirmSubscription&Token=2336412f37fb687f5d51e6e2425f004aed"]
    # A signed confirmation whose SubscribeURL points elsewhere is not followed.
    elsewhere = sns_message(sns_key, ses.base + "cert.pem", message_type="SubscriptionConfirmation",
                            message="x", SubscribeURL="http://192.0.2.1/confirm", Token="t")
    assert client.post("/webhooks/ses", json=elsewhere).status_code == 403


def test_ses_webhooks_are_closed_until_a_topic_is_set(client: TestClient, sns_key: rsa.RSAPrivateKey,
                                                      cert_server: CertServer) -> None:
    """Without MAILER_SNS_TOPIC_ARNS the endpoint says how to open it."""
    answer = client.post("/webhooks/ses", json=sns_message(sns_key, cert_server.base + "cert.pem"))
    assert answer.status_code == 403
    assert "set MAILER_SNS_TOPIC_ARNS" in answer.json()["detail"]
    assert client.post("/webhooks/mailgun", json={}).status_code == 404


# --- Postmark --------------------------------------------------------------------------------------


def postmark_bounce(email: str, *, kind: str = "HardBounce", details: str = "smtp;550 5.1.1 no such user") -> dict:
    return {"RecordType": "Bounce", "ID": 4323372036854775807, "Type": kind, "TypeCode": 1, "Name": "Hard bounce",
            "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "ServerID": 23, "MessageStream": "outbound",
            "Description": "The server was unable to deliver your message.", "Details": details, "Email": email,
            "From": "newsletter@news.example.org", "BouncedAt": "2026-11-25T09:14:06.9070259Z",
            "Inactive": True, "CanActivate": True, "Subject": "Petition: talks, not tanks"}


def test_postmark_with_basic_auth_or_token(client: TestClient, env: Callable[..., None]) -> None:
    """Postmark's events are taken with the right user and password or token, and refused otherwise."""
    env(postmark_webhook_user="postmark", postmark_webhook_password="hook-password-123",
        postmark_webhook_token="hook-token-456")
    hard, soft, complainer = sent_campaign(3)
    assert client.post("/webhooks/postmark", json=postmark_bounce(hard.email)).status_code == 401
    wrong = client.post("/webhooks/postmark", json=postmark_bounce(hard.email), auth=("postmark", "guess"))
    assert wrong.status_code == 403
    assert wrong.json()["detail"] == "The Postmark webhook's user name or password is wrong."
    assert client.post("/webhooks/postmark?token=nope", json=postmark_bounce(hard.email)).status_code == 403
    assert inbound_rows() == []

    ok = client.post("/webhooks/postmark", json=postmark_bounce(hard.email), auth=("postmark", "hook-password-123"))
    assert ok.status_code == 200
    mailbox_full = postmark_bounce(soft.email, kind="SoftBounce", details="smtp;552 5.2.2 mailbox full")
    mailbox_full["ID"] = 4323372036854775808
    assert client.post("/webhooks/postmark?token=hook-token-456", json=mailbox_full).status_code == 200
    complaint = {"RecordType": "SpamComplaint", "ID": 42, "Type": "SpamComplaint", "Email": complainer.email,
                 "MessageID": "00000000-0000-0000-0000-000000000042"}
    assert client.post("/webhooks/postmark", json=complaint,
                       headers={"X-Webhook-Token": "hook-token-456"}).status_code == 200
    queue.drain()
    assert subscriber_row(hard.email).status is Status.bounced
    soft_row = subscriber_row(soft.email)
    assert soft_row is not None
    assert (soft_row.status, soft_row.bounce_score) == (Status.confirmed, 1)
    assert subscriber_row(complainer.email).status is Status.complained
    assert sorted(row.kind.value for row in inbound_rows()) == ["bounce", "bounce", "complaint"]


# --- SendGrid --------------------------------------------------------------------------------------


@pytest.fixture
def sendgrid_key(env: Callable[..., None]) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    env(sendgrid_public_key=base64.b64encode(public).decode())
    return key


def sendgrid_post(client: TestClient, key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]],
                  *, timestamp: str = "1764061447", tamper: bool = False) -> Any:
    body = json.dumps(events).encode()
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    if tamper:
        body = body.replace(b"5.1.1", b"4.2.2")
    return client.post("/webhooks/sendgrid", content=body, headers={
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp})


def test_sendgrid_signed_events(client: TestClient, sendgrid_key: ec.EllipticCurvePrivateKey) -> None:
    """Signed SendGrid events are processed (a bounce, a block that counts nothing, a spam report, an
    unsubscribe); opens are not stored; a changed body, another key or missing headers are refused."""
    bounced, blocked, reported, left = sent_campaign(4)
    events = [
        {"email": bounced.email, "event": "bounce", "type": "bounce", "status": "5.1.1", "reason": "550 5.1.1 no user",
         "smtp-id": bounced.message_id, "sg_event_id": "ZGVsaXZlcmVk-1", "timestamp": 1764061440},
        {"email": blocked.email, "event": "bounce", "type": "blocked", "status": "5.7.1",
         "reason": "550 5.7.1 blocked by policy", "sg_event_id": "ZGVsaXZlcmVk-2", "timestamp": 1764061441},
        {"email": reported.email, "event": "spamreport", "smtp-id": reported.message_id,
         "sg_event_id": "ZGVsaXZlcmVk-3", "timestamp": 1764061442},
        {"email": left.email, "event": "unsubscribe", "sg_event_id": "ZGVsaXZlcmVk-4", "timestamp": 1764061443},
        {"email": left.email, "event": "open", "sg_event_id": "ZGVsaXZlcmVk-5", "timestamp": 1764061444},
    ]
    assert sendgrid_post(client, sendgrid_key, events, tamper=True).status_code == 403
    other = ec.generate_private_key(ec.SECP256R1())
    refused = sendgrid_post(client, other, events)
    assert refused.status_code == 403
    assert "does not match this request" in refused.json()["detail"]
    unsigned = client.post("/webhooks/sendgrid", json=events)
    assert unsigned.status_code == 401
    assert "signed event webhook" in unsigned.json()["detail"]
    assert inbound_rows() == []

    answer = sendgrid_post(client, sendgrid_key, events)
    assert answer.status_code == 200
    assert (answer.json()["stored"], answer.json()["received"]) == (4, 4)
    queue.drain()
    assert subscriber_row(bounced.email).status is Status.bounced
    blocked_row = subscriber_row(blocked.email)
    assert blocked_row is not None
    assert (blocked_row.status, blocked_row.bounce_score) == (Status.confirmed, 0)
    block = next(row for row in inbound_rows() if row.subscriber_id == blocked.subscriber_id)
    assert (block.kind, block.severity) == (InboundKind.bounce, "block")
    assert subscriber_row(reported.email).status is Status.complained
    assert subscriber_row(left.email).status is Status.unsubscribed
    complaint = next(row for row in inbound_rows() if row.kind is InboundKind.complaint)
    assert complaint.delivery_id == reported.delivery_id


def test_a_webhook_body_over_the_limit_is_refused(client: TestClient, env: Callable[..., None]) -> None:
    """A body larger than MAILER_INBOUND_MAX_BYTES gets 413 with a sentence, and nothing is stored."""
    env(inbound_max_bytes="10000", postmark_webhook_token="hook-token-456")
    big = [postmark_bounce(f"reader{i}@example.org") for i in range(40)]
    answer = client.post("/webhooks/postmark?token=hook-token-456", json=big)
    assert answer.status_code == 413
    assert "MAILER_INBOUND_MAX_BYTES" in answer.json()["detail"]
    assert inbound_rows() == []
