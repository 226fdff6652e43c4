"""Provider webhooks: check that the provider sent it, then turn each event into an inbound row.

    Amazon SES via SNS   the SNS signature (RSA, SignatureVersion 1: SHA1, 2: SHA256) over the canonical
                         fields, with the signing certificate fetched only from a trusted URL
                         (sns.<region>.amazonaws.com over https, or MAILER_SNS_CERT_URL_PREFIXES), and a
                         TopicArn in MAILER_SNS_TOPIC_ARNS. A SubscriptionConfirmation is confirmed only
                         when all of that holds, by fetching its SubscribeURL (also a trusted URL).
    Postmark             HTTP basic auth (MAILER_POSTMARK_WEBHOOK_USER / _PASSWORD) or a token
                         (MAILER_POSTMARK_WEBHOOK_TOKEN, as ?token= or the X-Webhook-Token header)
    SendGrid             the signed event webhook: ECDSA P-256 / SHA-256 over timestamp + body, with the
                         key in MAILER_SENDGRID_PUBLIC_KEY

A failed check raises Rejected with the HTTP status and a sentence; nothing is stored.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from mailer.bounces import Severity, classify, enhanced_code
from mailer.config import get_settings
from mailer.errors import Rejected
from mailer.public_keys import load_ec_public_key

PROVIDERS = ("ses", "postmark", "sendgrid")
AWS_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
FETCH_TIMEOUT = 10.0


@dataclass(frozen=True)
class Event:
    """One provider event, reduced to what the policy needs."""

    kind: str  # bounce, delay, complaint, unsubscribe or ignored
    email: str
    detail: str
    status: str = ""
    severity: Severity | None = None
    message_id: str = ""
    return_path: str = ""


# --- Keys and signatures ---------------------------------------------------------------------------


def verify_sendgrid(*, signature: str | None, timestamp: str | None, body: bytes) -> None:
    settings = get_settings()
    if not settings.sendgrid_public_key:
        raise Rejected(403, "SendGrid webhooks are not accepted here: set MAILER_SENDGRID_PUBLIC_KEY to the "
                            "event webhook's verification key.")
    if not signature or not timestamp:
        raise Rejected(401, "The request has no X-Twilio-Email-Event-Webhook-Signature and -Timestamp headers; "
                            "turn on the signed event webhook in SendGrid.")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        load_ec_public_key(settings.sendgrid_public_key).verify(
            raw_signature, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, binascii.Error):
        raise Rejected(403, "The SendGrid signature does not match this request; it was not sent by SendGrid "
                            "with the configured key.") from None


def check_postmark(*, authorization: str | None, token: str | None) -> None:
    settings = get_settings()
    user, password, expected = (settings.postmark_webhook_user, settings.postmark_webhook_password,
                                settings.postmark_webhook_token)
    if not (user and password) and not expected:
        raise Rejected(403, "Postmark webhooks are not accepted here: set MAILER_POSTMARK_WEBHOOK_USER and "
                            "MAILER_POSTMARK_WEBHOOK_PASSWORD, or MAILER_POSTMARK_WEBHOOK_TOKEN.")
    if expected and token is not None:
        if hmac.compare_digest(token.encode(), expected.encode()):
            return
        raise Rejected(403, "The Postmark webhook token is wrong.")
    if user and password and authorization:
        scheme, _, encoded = authorization.partition(" ")
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        if scheme.lower() == "basic" and hmac.compare_digest(given, f"{user}:{password}".encode()):
            return
        raise Rejected(403, "The Postmark webhook's user name or password is wrong.")
    raise Rejected(401, "The request carries no credentials: give Postmark the webhook URL with the user name "
                        "and password (https://user:password@…), or with ?token=….")


def _trusted(url: str) -> bool:
    settings = get_settings()
    if settings.sns_cert_url_prefixes:
        return any(url.startswith(prefix) for prefix in settings.sns_cert_url_prefixes)
    parts = urlsplit(url)
    return parts.scheme == "https" and bool(AWS_SNS_HOST.fullmatch(parts.hostname or "")) and not parts.username


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A trusted URL must not send us on to an untrusted one."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _fetch(url: str, what: str) -> bytes:
    if not _trusted(url):
        raise Rejected(403, "The SNS message points at a URL that is not Amazon SNS's; it is not trusted.")
    try:
        with _OPENER.open(url, timeout=FETCH_TIMEOUT) as response:
            return bytes(response.read(1_000_000))
    except OSError as error:
        # 503 so that SNS tries again later: the fault is on the way to Amazon, not in the message.
        raise Rejected(503, f"The SNS {what} could not be fetched ({error}); please retry.") from None


@lru_cache(maxsize=16)
def _certificate(url: str) -> rsa.RSAPublicKey:
    try:
        key = x509.load_pem_x509_certificate(_fetch(url, "signing certificate")).public_key()
    except ValueError:
        raise Rejected(403, "The SNS signing certificate is not a PEM certificate.") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise Rejected(403, "The SNS signing certificate does not hold an RSA key.")
    return key


SNS_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}


def sns_string_to_sign(message: dict[str, Any]) -> bytes:
    fields = SNS_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise Rejected(403, f"{str(message.get('Type'))[:40]!r} is not an SNS message type.")
    lines = []
    for name in fields:
        if name in message and message[name] is not None:
            lines.append(f"{name}\n{message[name]}\n")
        elif name != "Subject":
            raise Rejected(403, f"The SNS message lacks its {name}.")
    return "".join(lines).encode()


def verify_sns(message: dict[str, Any]) -> None:
    settings = get_settings()
    if not settings.sns_topic_arns:
        raise Rejected(403, "Amazon SES webhooks are not accepted here: set MAILER_SNS_TOPIC_ARNS to the ARN of "
                            "the SNS topic that carries your SES notifications.")
    # Checked first, so a foreign topic costs no certificate fetch; the signature then covers the TopicArn.
    if message.get("TopicArn") not in settings.sns_topic_arns:
        raise Rejected(403, f"The SNS topic {str(message.get('TopicArn'))[:200]} is not in MAILER_SNS_TOPIC_ARNS.")
    version = str(message.get("SignatureVersion", ""))
    if version not in {"1", "2"}:
        raise Rejected(403, "The SNS message has no SignatureVersion 1 or 2.")
    url = str(message.get("SigningCertURL") or message.get("SigningCertUrl") or "")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(403, "The SNS signature is not base64.") from None
    key = _certificate(url)
    try:
        key.verify(signature, sns_string_to_sign(message), padding.PKCS1v15(),
                   hashes.SHA1() if version == "1" else hashes.SHA256())  # noqa: S303 - SNS v1 is SHA1.
    except InvalidSignature:
        raise Rejected(403, "The SNS signature does not match the message; it was not sent by Amazon SNS.") from None


def confirm_sns_subscription(message: dict[str, Any]) -> None:
    """Confirm a verified SubscriptionConfirmation by fetching its SubscribeURL, which must be SNS's own."""
    _fetch(str(message.get("SubscribeURL", "")), "SubscribeURL")


# --- Events ----------------------------------------------------------------------------------------


def _ses_records(notification: dict[str, Any]) -> list[dict[str, Any]]:
    kind = str(notification.get("notificationType") or notification.get("eventType") or "")
    if kind == "Bounce":
        return list(notification.get("bounce", {}).get("bouncedRecipients") or [])
    if kind == "Complaint":
        return list(notification.get("complaint", {}).get("complainedRecipients") or [])
    return []


def split_ses(sns: dict[str, Any]) -> list[tuple[str, bytes]]:
    """One (source_ref, raw) per recipient of a verified SNS Notification; other SES notifications give none."""
    try:
        notification = json.loads(str(sns.get("Message", "")))
    except json.JSONDecodeError:
        return []
    if not isinstance(notification, dict):
        return []
    out = []
    for index, _record in enumerate(_ses_records(notification)):
        raw = json.dumps({"sns_message_id": sns.get("MessageId"), "recipient": index,
                          "notification": notification}).encode()
        out.append((f"ses:{sns.get('MessageId')}:{index}", raw))
    return out


POSTMARK_HARD = {"HardBounce", "BadEmailAddress"}
POSTMARK_BLOCK = {"Blocked", "SpamNotification", "DMARCPolicy", "ContentRejected"}
POSTMARK_IGNORED = {"Subscribe", "AutoResponder", "AddressChange", "OpenRelayTest", "ChallengeVerification",
                    "VirusNotification", "SMTPApiError", "InboundError", "TemplateRenderingFailed",
                    "ManuallyDeactivated", "Unconfirmed"}


def split_postmark(payload: Any) -> list[tuple[str, bytes]]:
    events = payload if isinstance(payload, list) else [payload]
    out = []
    for event in events:
        if isinstance(event, dict) and event.get("RecordType") in {"Bounce", "SpamComplaint", "SubscriptionChange"}:
            ref = f"postmark:{event.get('RecordType')}:{event.get('ID') or event.get('MessageID')}:" \
                  f"{event.get('Email') or event.get('Recipient')}"
            out.append((ref[:300], json.dumps(event).encode()))
    return out


SENDGRID_KEPT = {"bounce", "spamreport", "unsubscribe", "group_unsubscribe"}


def split_sendgrid(payload: Any) -> list[tuple[str, bytes]]:
    if not isinstance(payload, list):
        return []
    out = []
    for event in payload:
        if isinstance(event, dict) and event.get("event") in SENDGRID_KEPT:
            ref = f"sendgrid:{event.get('sg_event_id') or json.dumps(event, sort_keys=True)[:200]}"
            out.append((ref[:300], json.dumps(event).encode()))
    return out


def _ses_event(data: dict[str, Any]) -> Event:
    notification = data["notification"]
    record = _ses_records(notification)[int(data["recipient"])]
    mail = notification.get("mail") or {}
    common = mail.get("commonHeaders") or {}
    message_id = str(common.get("messageId") or "")
    email = str(record.get("emailAddress") or "")
    source = str(mail.get("source") or "")
    kind = str(notification.get("notificationType") or notification.get("eventType"))
    if kind == "Complaint":
        feedback = notification.get("complaint", {}).get("complaintFeedbackType") or "abuse"
        return Event("complaint", email, f"Amazon SES complaint ({feedback}) by {email}",
                     message_id=message_id, return_path=source)
    bounce = notification.get("bounce") or {}
    status = enhanced_code(str(record.get("status") or "")) or enhanced_code(str(record.get("diagnosticCode") or ""))
    bounce_type = str(bounce.get("bounceType") or "")
    severity = classify(status) if status else (Severity.hard if bounce_type == "Permanent" else Severity.soft)
    detail = (f"Amazon SES {bounce_type or 'bounce'}/{bounce.get('bounceSubType') or '-'} for {email} "
              f"({status or 'no status'}: {str(record.get('diagnosticCode') or '')[:300]})")
    return Event("bounce", email, detail, status, severity, message_id, source)


def _postmark_event(data: dict[str, Any]) -> Event:
    record_type = data.get("RecordType")
    email = str(data.get("Email") or data.get("Recipient") or "")
    message_id = str(data.get("Content") or "")[:20000]
    if record_type == "SpamComplaint":
        return Event("complaint", email, f"Postmark spam complaint by {email}", message_id=message_id)
    if record_type == "SubscriptionChange":
        if data.get("SuppressSending") and data.get("SuppressionReason") == "ManualSuppression":
            return Event("unsubscribe", email, f"Postmark: {email} unsubscribed through Postmark")
        return Event("ignored", email, f"Postmark subscription change for {email} "
                                       f"({data.get('SuppressionReason')}): reported by its own event.")
    bounce_type = str(data.get("Type") or "")
    if bounce_type in POSTMARK_IGNORED:
        return Event("ignored", email, f"Postmark {bounce_type} for {email}: not a failure.")
    if bounce_type == "Unsubscribe":
        return Event("unsubscribe", email, f"Postmark: an unsubscribe request by {email}")
    status = enhanced_code(str(data.get("Details") or ""))
    if bounce_type in POSTMARK_BLOCK:
        severity = Severity.block
    else:
        severity = classify(status) if status else (Severity.hard if bounce_type in POSTMARK_HARD else Severity.soft)
    detail = f"Postmark {bounce_type} for {email} ({status or 'no status'}: {str(data.get('Details') or '')[:300]})"
    return Event("bounce", email, detail, status, severity, message_id)


def _sendgrid_event(data: dict[str, Any]) -> Event:
    kind = data.get("event")
    email = str(data.get("email") or "")
    message_id = str(data.get("smtp-id") or "")
    if kind == "spamreport":
        return Event("complaint", email, f"SendGrid spam report by {email}", message_id=message_id)
    if kind in {"unsubscribe", "group_unsubscribe"}:
        return Event("unsubscribe", email, f"SendGrid: {email} unsubscribed ({kind})", message_id=message_id)
    status = enhanced_code(str(data.get("status") or "")) or enhanced_code(str(data.get("reason") or ""))
    blocked = data.get("type") == "blocked"
    # A block is about the sender's reputation or content, never proof that the address is bad.
    severity = Severity.block if blocked else classify(status)
    detail = f"SendGrid {'block' if blocked else 'bounce'} for {email} ({status or 'no status'}: " \
             f"{str(data.get('reason') or '')[:300]})"
    return Event("bounce", email, detail, status, severity, message_id)


def event_of(channel: str, data: dict[str, Any]) -> Event:
    if channel == "ses":
        return _ses_event(data)
    if channel == "postmark":
        return _postmark_event(data)
    if channel == "sendgrid":
        return _sendgrid_event(data)
    raise ValueError(f"unknown webhook channel {channel}")
