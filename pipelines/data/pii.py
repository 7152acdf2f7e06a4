"""PII redaction: emails, IP addresses and phone numbers become placeholders; each replacement is counted.

Regexes, not a model: they favour precision on prose and code (see docs/data.md for what they miss).
"""
from __future__ import annotations

import re

from cluster.schemas.data import PIIConfig

EMAIL_PLACEHOLDER = "<EMAIL>"
IP_PLACEHOLDER = "<IP_ADDRESS>"
PHONE_PLACEHOLDER = "<PHONE>"

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")
# Full (uncompressed) IPv6 only: the '::' forms collide with C++/Rust paths and Python slices.
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
# Optional +country code, then a 3-digit area code (optionally in parentheses), 3 digits, 4 digits, with
# separators: bare digit runs (ids, timestamps) are not phone numbers.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)")

PII_KINDS = ("email", "ip", "phone")


def redact(text: str, cfg: PIIConfig | None = None) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders; returns (text, {"email": n, "ip": n, "phone": n})."""
    cfg = cfg or PIIConfig()
    counts = {kind: 0 for kind in PII_KINDS}
    if cfg.emails:
        text, counts["email"] = EMAIL.subn(EMAIL_PLACEHOLDER, text)
    if cfg.ip_addresses:
        text, n4 = IPV4.subn(IP_PLACEHOLDER, text)
        text, n6 = IPV6.subn(IP_PLACEHOLDER, text)
        counts["ip"] = n4 + n6
    if cfg.phone_numbers:
        text, counts["phone"] = PHONE.subn(PHONE_PLACEHOLDER, text)
    return text, counts
