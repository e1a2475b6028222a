#!/usr/bin/env python3
"""alertbridge: Prometheus Alertmanager -> DingTalk group robots, with an alert history.

The file reads top to bottom the way an alert travels through it:

   1. Records        what crosses sections: the alert, the webhook, a message's Body (alerts,
                     card, mention) and Mentions, a Note, the journal's two events, times as
                     the stores keep them, the steady clock, group_hash; the error types
   2. Templates      str.format with blanks over declared fields (a name and one [key]),
                     shared by config validation, the preview and rendering
   3. Config         config.ini -> Config: one dataclass per section (its defaults written
                     once), Robot and Route (the config side of an Alertmanager receiver),
                     people, rotations, escalations; credentials from files and ${ENV}
   4. Intake         the v4 payload (or Grafana's, version "1") -> Webhook; Intake (route,
                     journal, answer); HTTP server (/alertmanager[/RECEIVER], and
                     /dingtalk/TARGET/send of the bridge it replaces), the Endpoints it
                     serves, the Requests under way
   5. Storage        all SQL; the Journal (local SQLite, one daemon's: messages to send, events
                     to record, the send log, cards, relayed notes); the Store (history:
                     alerts, incidents, their events and notes; MySQL or SQLite) and its
                     child process
   6. Packing        digest and split plans: pure functions, sizes in, groups out
   7. Rendering      a Body -> a Rendered message, any channel's input (templates, escaping,
                     links, mentions from config and labels, buttons; {history}); the plan of
                     how a body goes out (parts, a card's @ message)
   8. Transport      Deadline and exchange_json (one HTTP exchange, one failure rule), the
                     retry delays, the RFC 6455 WebSocket client
   9. Channels       Channel, what every kind of robot shares; RobotChannel, DingTalk's
                     custom group robot (markdown, actionCard, the @ text message, signing);
                     FeishuChannel (a card, signed in the body); WeComChannel (markdown, an @
                     text message); each one's limits, rate windows, one request and its
                     answer classified once (SendResult) with its fix; post_message, the one
                     POST; CHANNELS by kind; Channels (each robot's own)
  10. Robot pool     robots used in turn, budgets per token, a reserve, fair turns between
                     routes, throttles, hanging robots, disabled robots (a config error)
  11. Workers        Worker (owns a thread); Notifier; Senders (a pool of threads) and one
                     RouteSender per route, in stages: choose, plan, deliver, Ledger, `sent`;
                     test messages; Recorder
  12. On call        who is on call (rotations), signed links, the escalation chain; Escalator
                     (steps due, marked done with their notes in the history), NoteRelay (the
                     history's notes into this journal, folded), AlertmanagerAPI and the
                     Follower (silenced incidents, as Alertmanager has them), Desk (claims and
                     silences, however they come)
  13. Cluster        several instances on one MySQL: members, a leader by lease fenced by its
                     own clock, claims, handoffs from standbys, shared budgets
  14. Observability  metrics, sd_notify, the watchdog; what a request accounts for
                     (SendAccounting), /-/ready and /metrics (Probes)
  15. Pages          StatusPage, IncidentPages (what a Claim or Silence link opens), Preview,
                     the dry run: HTML, escaped, no script
  16. Bridge         one instance: wiring, start, reload, stop
  17. Command line   logging (text or JSON lines), --check-config, --send-test, --init-db,
                     --render, --import-webhook-dingtalk, run(), main()
  18. DingTalk app   a wing, off unless [app] is set: AppAPI (token, cards, DING), the
                     StreamClient (the leader's connection to DingTalk's gateway), AppPager
                     (pages as cards, updated in place), AppDesk (clicks and commands)

Invariants: an accepted webhook is on disk in the journal before Alertmanager gets its 200;
nothing accepted is dropped (a message that cannot be sent waits, is retried, and after
`max_age` is marked expired, never deleted unseen); paging never waits for the history
database; no robot sends more than `rate_limit` per `rate_window`; a token or secret never
reaches a log line, a metric or a database. Durations and deadlines (budgets, retries, expiry)
use the steady clock; only what is stored or shown uses the wall clock.

Threads: "http" accepts connections, with a thread per connection (IntakeHandler); eight
"sender-N" threads (Senders) serve every route, one thread a route at a time, so a route's
messages go out in order and the thread count does not grow with routes; "notifier" expires
old messages and keeps a sender for each route with messages; "recorder" copies journal events
into the history through the store process; "watchdog" pets systemd; with [cluster],
"cluster" holds or watches the leader's lease; on the instance that sends, "escalator" takes
the steps due and journals the history's incident notes (NoteRelay), "follower" follows
silenced incidents in Alertmanager, and with [app] "stream" holds the app's Stream connection
and two "command-N" answer what people write to the robot (while they write). Short-lived:
"history" reads an alert's earlier occurrences for a sender (Recurrence), "ding" makes an
escalation round's DING, a Deadline's timer ends a slow request. The main thread waits for
signals (run()).

Locks, each described where it is made: Journal._write_lock serializes every journal write on
one connection, and its holder takes Journal._queue_lock briefly to collect the webhooks queued
for one group commit (the only nesting). Senders._cond guards which route is due and served;
RobotPool._lock budgets and turns; Recent._lock a cache's entries; Metrics._lock the
counters; Recurrence._lock its answers; Requests._done the count of requests; AppAPI._lock the
app's token; Deadline._lock its sockets, between its timer and the request; Worker._idle what
wait_idle() waits on; Bridge._reload_lock one reload at a time: all held for bookkeeping only.
StoreProcess._lock makes calls on the pipe one at a time (the recorder's; the status page's,
which waits for it 2 s at most); Coordinator._lock statements on the cluster's MySQL session;
WebSocket._send_lock one frame at a time on the Stream connection (held while a frame is
written to DingTalk's gateway, so that the reader's answers and the owner's pings take turns).
No lock is held during a request to a robot. tests/test_style.py holds this map to the code.

Where a change goes (each touches at most two sections; docs/development.md has the lines):
  - another kind of robot: a Channel with RobotChannel's methods and attributes (KIND, NAME,
    PERSON_KEY, the [person] key of its user ids; RATE_LIMITS, its platform's windows) and
    its entry in CHANNELS (9. Channels); its [robot:NAME] kind, or its URL, chooses it, and
    3. Config changes only for a key of its own. Feishu's and WeCom's were built so.
    Channels gives each robot its own; a receiver may mix kinds;
  - a channel tried before the robots: an object with takes(), page() and a robot, given to
    RouteSender as one of its `ahead` (16. Bridge), in its own section (the app's: 18);
  - the digest's grouping: RouteSender._choose and _digest (11. Workers), its layout
    Renderer.render and digest_title (7. Rendering);
  - a metric: METRIC_HELP (14. Observability), and where it counts: a listener of a Signal in
    14 (SendAccounting for requests), or the one component that knows;
  - a cluster rule: its pure function and Coordinator (13. Cluster), its statements in 5.
"""

import sys

SUPPORTED_PYTHON = (3, 9)
if sys.version_info < SUPPORTED_PYTHON:  # before any import or syntax a newer Python added
    sys.stderr.write("alertbridge needs Python 3.9 or newer; this is Python %d.%d.%d (%s)\n"
                     % (sys.version_info[:3] + (sys.executable,)))
    sys.exit(2)

import signal  # noqa: E402 (after the version check, on purpose)

DAEMON_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
if __name__ == "__main__":  # before anything slow: see run() for why, and main() for the commands
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)

import argparse  # noqa: E402
import base64  # noqa: E402
import collections  # noqa: E402
import configparser  # noqa: E402
import contextlib  # noqa: E402
import difflib  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import html  # noqa: E402
import http.client  # noqa: E402
import http.cookies  # noqa: E402
import http.server  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing.connection  # noqa: E402
import queue  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import sqlite3  # noqa: E402
import string  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from dataclasses import MISSING, asdict, dataclass, field, fields, replace  # noqa: E402
from datetime import date, datetime, timedelta, timezone  # noqa: E402
from datetime import time as dtime  # noqa: E402

VERSION = "0.7.0"
log = logging.getLogger("alertbridge")
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _EscapeControlCharacters(logging.Filter):
    """Requests put their own text in the log (receiver names, group keys, reasons): a newline
    in it must not start a forged log line. Control characters in every message become escapes."""

    def filter(self, record):
        message = record.getMessage()
        if _CONTROL_CHARACTERS.search(message):
            escaped = _CONTROL_CHARACTERS.sub(lambda m: ascii(m.group())[1:-1], message)
            record.msg, record.args = escaped, None
        return True


log.addFilter(_EscapeControlCharacters())


def logfmt(value):
    """A free-text value (a receiver, a reason, DingTalk's errmsg) for a key=value log field:
    quoted as a JSON string when it holds a space, a quote or an equals sign, so the text line
    reads as logfmt and log_format = json takes the field whole."""
    text = str(value)
    if text and not re.search(r'[\s"=]', text) and not _CONTROL_CHARACTERS.search(text):
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    return _CONTROL_CHARACTERS.sub(lambda m: "\\u%04x" % ord(m.group()), quoted)


# =============================================================================================
# 1. Records: what crosses sections
# =============================================================================================
#
# The alert, as normalize_alert() makes it and the journal, the renderer and the store read it:
#   {"fingerprint": str (<= 64), "status": "firing" | "resolved",
#    "starts_at": db_time, "ends_at": db_time or None (None while firing),
#    "labels": {str: str}, "annotations": {str: str}, "generator_url": str,
#    "external_url": str, "receiver": Alertmanager's receiver name (<= 128)}
# and, for an alert from Grafana's webhook contact point only (grafana_fields()),
#   "grafana": {"silence_url": str, "dashboard_url": str, "panel_url": str, "image_url": str,
#               "values": str (the query values that fired it, as text, bounded)}
#
# A message's body: Body below (the journal keeps it as JSON, Body.to_json()).
#
# The journal's two events, which the recorder copies into the history: webhook_event() and
# send_event() below.

class ConfigError(Exception):
    """config.ini cannot be used; the message names the section and key, never a value. One
    line per error: a file's every error is reported in one run (load_config)."""

    @property
    def lines(self):
        return str(self).split("\n")


class BadRequest(Exception):
    """A request that can never succeed: answered 4xx with a one-line JSON reason."""

    def __init__(self, status, reason, headers=()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class StartError(Exception):
    """The daemon cannot start (the port, the journal's directory...): one line says why."""


class JournalDamaged(StartError):
    """The journal file cannot be opened as a journal; the message says how to go on."""


class StoreUnavailable(Exception):
    """The history database cannot be reached (or a table is gone), or refuses alertbridge's
    user a privilege (`denied`: a grant fixes it, no restart needed); the recorder retries."""

    def __init__(self, message, denied=False):
        super().__init__(message)
        self.denied = denied


class StoreConflict(Exception):
    """A history transaction rolled back because another was in its way (two instances
    recording the same webhooks): worth trying again at once."""


class StoreError(Exception):
    """A store call failed in the store process for a reason other than reachability."""


@dataclass
class Webhook:
    receiver: str           # Alertmanager's receiver: the path segment, else the payload's
    external_url: str
    group_key: str
    alerts: list            # alerts as normalize_alert() makes them
    truncated: int = 0
    group_labels: dict = field(default_factory=dict)


NO_LEVEL = "none"       # the level of an alert whose priority label is missing or unknown
ALERTMANAGER, GRAFANA = "alertmanager", "grafana"   # where an incident's alerts come from
ALERTS, CARD, MENTION, NOTE = "alerts", "card", "mention", "note"  # the kinds of a message body


DEFAULT_KIND = "dingtalk"    # the kind of robot, and of user id, when none is named


@dataclass(frozen=True)
class Mentions:
    """Who a message @-mentions: phone numbers, user ids, everyone. How a mention is written is
    the channel's. A user id is of one platform: DingTalk's as it is, another channel's as
    KIND:ID (wecom:zhangsan), so that the journal, the history's notes and folding carry every
    platform's unchanged; each channel takes its own (user_ids_of)."""
    mobiles: tuple = ()
    user_ids: tuple = ()
    all: bool = False

    def __bool__(self):
        return bool(self.mobiles or self.user_ids or self.all)

    def user_ids_of(self, kind):
        return tuple(qualified_id(kind, u) for u in self.user_ids
                     if qualified_id(kind, u) is not None)


def qualified_id(kind, user_id):
    """A user id as platform `kind` knows it, or None if it is another platform's (see
    Mentions)."""
    platform, sep, bare = user_id.rpartition(":")
    return bare if (platform or DEFAULT_KIND) == kind else None


@dataclass(frozen=True)
class Body:
    """What a message says, as the journal keeps it and every stage after reads it. Its kind:
    ALERTS, alerts to show; CARD, alerts shown with buttons, whose mentions went into a
    message of their own (a channel that cannot @ beside buttons); MENTION, that message: who,
    and the title of the card it follows (no alerts: they went out in the card); NOTE, a short
    line about an incident (who claimed it), a title and its markdown text."""
    alerts: tuple = ()
    truncated: int = 0                  # Alertmanager's truncatedAlerts
    group_labels: dict = field(default_factory=dict)
    group_key: str = ""                 # Alertmanager's group (its incident; "" in a digest)
    level: str = NO_LEVEL               # a digest's level, for its title
    digest: bool = False                # folded from a backlog, grouped by alertname
    part: tuple = None                  # (i, n): part i of a message too long for one request
    total: tuple = None                 # a part's: (firing, resolved) of the whole message
    kind: str = ALERTS
    mention: Mentions = Mentions()      # MENTION: who
    title: str = ""                     # MENTION: the card's title; NOTE: its title
    note: str = ""                      # NOTE: its markdown text

    def to_json(self):
        """The journal's JSON object (the keys written by every version since 0.3)."""
        data = {"alerts": list(self.alerts), "truncated": self.truncated}
        if self.group_labels:
            data["group_labels"] = self.group_labels
        if self.group_key:
            data["group_key"] = self.group_key
        if self.digest:
            data.update(digest=True, level=self.level)
        if self.part:
            data["part"] = list(self.part)
        if self.total:
            data["total"] = list(self.total)
        if self.kind == CARD:
            data["card"] = True
        if self.kind == NOTE:
            data["note"] = {"title": self.title, "text": self.note,
                            "mobiles": list(self.mention.mobiles),
                            "user_ids": list(self.mention.user_ids)}
        if self.kind == MENTION:
            data["mention"] = {"mobiles": list(self.mention.mobiles), "all": self.mention.all,
                               "user_ids": list(self.mention.user_ids), "title": self.title}
        return data

    @classmethod
    def from_json(cls, data):
        mention, note = data.get("mention"), data.get("note")
        if note:
            return cls(kind=NOTE, title=note["title"], note=note["text"],
                       mention=Mentions(tuple(note.get("mobiles", ())),
                                        tuple(note.get("user_ids", ()))))
        kind = MENTION if mention else CARD if data.get("card") else ALERTS
        return cls(alerts=tuple(data.get("alerts", ())), truncated=data.get("truncated", 0),
                   group_labels=data.get("group_labels") or {},
                   group_key=data.get("group_key", ""),
                   level=data.get("level", NO_LEVEL), digest=bool(data.get("digest")),
                   part=tuple(data["part"]) if data.get("part") else None,
                   total=tuple(data["total"]) if data.get("total") else None, kind=kind,
                   mention=Mentions(tuple(mention["mobiles"]), tuple(mention["user_ids"]),
                                    mention["all"]) if mention else Mentions(),
                   title=mention["title"] if mention else "")


@dataclass(frozen=True)
class Note:
    """What a group hears of one of its incidents (an escalation step, a claim, a silence),
    kept in the history until it is sent, whichever instance sends it (see NoteRelay). `key`
    (note_key) is its send key in a cluster; `text` is markdown; `created_at` a db_time."""
    key: str
    incident_id: int
    route: str          # the route whose group hears it
    kind: str           # ESCALATED, CLAIMED, SILENCED
    level: str
    text: str
    mention: Mentions = Mentions()
    created_at: str = ""

    def row(self):
        """The note as plain values, as it crosses to the store process and back."""
        return (self.key, self.incident_id, self.route, self.kind, self.level, self.text,
                list(self.mention.mobiles), list(self.mention.user_ids), self.created_at)

    @classmethod
    def of_row(cls, row):
        key, incident_id, route, kind, level, text, mobiles, user_ids, created_at = row
        return cls(key, incident_id, route, kind, level, text,
                   Mentions(tuple(mobiles), tuple(user_ids)), created_at)


ESCALATED, CLAIMED, SILENCED = "escalated", "claimed", "silenced"     # the kinds of a Note


def note_key(*identity):
    """A note's key: the same decision (a step of a chain, a claim) gives the same key."""
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def webhook_event(webhook, request_id, received_at, route=None):
    """What the recorder writes for an accepted webhook: one history row per alert; with the
    `route` that took it, the incident of its Alertmanager group (opened while any alert fires,
    resolved when none does), with the latest start of its firing alerts, or the latest end of
    its resolved ones: what tells a late copy from the group's next incident."""
    event = {"receiver": webhook.receiver, "request_id": request_id,
             "received_at": db_time(received_at), "alerts": webhook.alerts}
    if route is not None and webhook.group_key:
        firing = [a for a in webhook.alerts if a["status"] == "firing"]
        ranks = [route.level(a) for a in firing]
        names = dict.fromkeys(a["labels"].get("alertname", "") for a in webhook.alerts)
        ends = [a["ends_at"] for a in webhook.alerts if a["ends_at"]]
        event["incident"] = {
            "route": route.name, "group_key": webhook.group_key,
            "group_labels": webhook.group_labels, "firing": bool(firing),
            "source": GRAFANA if any("grafana" in a for a in webhook.alerts) else ALERTMANAGER,
            "started_at": max(a["starts_at"] for a in firing) if firing else None,
            "ended_at": max(ends) if ends and len(ends) == len(webhook.alerts) else None,
            "level": min(ranks)[1] if ranks else NO_LEVEL,
            "rank": min(ranks)[0] if ranks else len(route.priority_order),
            "title": " ".join([", ".join(n for n in names if n)]
                              + [v for k, v in sorted(webhook.group_labels.items())
                                 if k != "alertname"])[:512]}
    return event


def send_event(route, robot, message, result, sent_at):
    """What the recorder writes for one DingTalk request: a notifications row and, when
    DingTalk took it, one more notified_count for each alert it carried, and its incident
    notes marked sent (the keys of a note's message). `sent_at`: wall time."""
    event = {"sent_at": epoch_db_time(sent_at), "route": route,
             "robot": robot.name, "request_id": message.request_id, "message_id": message.id,
             "alerts": [(a["receiver"], a["fingerprint"], a["starts_at"]) for a in message.alerts],
             "errcode": result.errcode, "errmsg": result.errmsg,
             "latency_ms": int(result.latency * 1000)}
    if getattr(message, "notes", ()):
        event["notes"] = list(message.notes)
    return event


_KEY_SEPARATORS = str.maketrans("\x1e\x1f", "??")


def alert_key(alert):
    """One occurrence of an alert, as the history keys it: receiver, fingerprint and start,
    joined by the ASCII unit separator (cheap to make and to split, on the hot path)."""
    occurrence = (alert["receiver"], alert["fingerprint"], alert["starts_at"])
    key = "\x1f".join(occurrence)
    if key.count("\x1f") != 2 or "\x1e" in key:     # a value holding a separator: plain it
        key = "\x1f".join(part.translate(_KEY_SEPARATORS) for part in occurrence)
    return key


def alert_keys(alerts):
    """A message's alert keys as the journal keeps them, joined by the record separator."""
    return "\x1e".join(alert_key(a) for a in alerts)


def send_key(webhook, level, alerts):
    """What a notification says, as a cluster takes it before sending: the same webhook,
    journaled by two instances or twice by one, gives the same key."""
    states = sorted((a["fingerprint"], a["starts_at"], a["status"]) for a in alerts)
    text = json.dumps([webhook.receiver, webhook.group_key, level, states], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def json_line(obj):
    """One line of JSON, as every answer and error body is."""
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def db_time(dt):
    """UTC datetime -> 'YYYY-MM-DD HH:MM:SS.mmm', the form both MySQL and SQLite store."""
    return dt.isoformat(" ", "milliseconds")[:23] if dt else None


def as_db_time(value):
    """A time as a store gave it, as db_time() writes it: MySQL gives datetimes, SQLite the
    text itself."""
    return db_time(value) if isinstance(value, datetime) else value


def epoch_db_time(epoch):
    """An epoch as the history keeps times (see db_time)."""
    return db_time(datetime.fromtimestamp(epoch, timezone.utc))


def from_db_time(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc) if text else None


def wall_time():
    """The wall clock: what is stored in the history and shown on pages."""
    return time.time()


class Recent:
    """A map of at most `size` entries, the oldest forgotten first, safe to share between
    threads (_lock guards its entries): the caches that spare a storm's sender work."""

    def __init__(self, size):
        self.size = size
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._entries.get(key)

    def put(self, key, value):
        with self._lock:
            while len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = value
        return value


class SteadyClock:
    """Seconds since the epoch as the wall clock said at the start, advanced by the monotonic
    clock since: an NTP step, a VM restore or a hand-set date moves the wall clock, never this.
    Budgets, retries, expiry and every other duration or deadline use it; what is stored in the
    history or shown uses the wall clock (Bridge.wall). The journal keeps its times, so they
    carry over a restart as wall times (see Journal.bring_forward)."""

    def __init__(self, wall=wall_time, monotonic=time.monotonic):
        self._monotonic = monotonic
        self._origin = wall() - monotonic()

    def __call__(self):
        return self._origin + self._monotonic()


TEXT_BYTES = 65535     # a MySQL TEXT column; labels and annotations go whole into JSON columns


def fit_text(text, limit=TEXT_BYTES):
    """`text` cut to `limit` UTF-8 bytes at a character boundary: a MySQL TEXT column refuses
    more, and with it the whole webhook's row batch. Both stores keep the same cut."""
    if text is None or len(text) * 4 <= limit:
        return text
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def group_hash(group_key):
    """How the history and the links name an Alertmanager group: its key, hashed."""
    return hashlib.sha256(group_key.encode()).hexdigest()


# =============================================================================================
# 2. Templates
# =============================================================================================
#
# A template is str.format text over a message's fields, with blanks. A field is a name, or a
# name and one [key] (`{labels[team]}`), with an optional conversion and format spec; nothing
# else: attribute access or indexing deeper would walk from a label map to the module and its
# secrets. What each kind of template can name is declared here, once (FieldSet); a template
# naming anything else is refused when the config loads and in the preview.

class Blank(dict):
    """A mapping where a missing key renders as an empty string."""

    def __missing__(self, key):
        return ""


class Untrusted(str):
    """Text from an alert (a label or annotation value): a template shows it escaped for
    where it lands (DingTalk markdown, a URL), unless the field asks for it `:raw`."""


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]~])")
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_LINE_START = re.compile(r"^(\s*)(#|>|[-+=]+(?=\s|$)|[0-9]+[.)](?=\s|$))")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?@])")   # <@userid> mentions someone in WeCom


def md_escape(text):
    """Alert text as DingTalk markdown shows it literally: `node_exporter_*x*` as written, not
    in italics (the specials escaped with a backslash, as prometheus-webhook-dingtalk's
    `markdown` function does, and brackets, which would make a link); line breaks as spaces and
    a heading, quote or list mark at its start escaped, so that a value never starts a line of
    its own; `<` before a tag name or @ full-width, so that a value cannot open a <font> tag
    or mention anyone (Feishu's <at id=all>, WeCom's <@userid>)."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    text = _LINE_BREAKS.sub(" ", text)
    text = _LINE_START.sub(r"\1\\\2", text)
    return _TAG_START.sub("＜", text)


def url_text(text):
    """A value put inside a URL: every reserved character percent-encoded."""
    return urllib.parse.quote(text, safe="")


ESCAPES = {"markdown": md_escape, "url": url_text, None: str}


@dataclass(frozen=True)
class FieldSet:
    """The fields a kind of template can name: text, numbers, and maps that take a [key]."""
    text: frozenset
    numbers: frozenset = frozenset()
    maps: frozenset = frozenset()

    def names(self):
        return self.text | self.numbers | self.maps

    def sample(self, name):
        """A value of the field's type, to try a format spec on."""
        return 1 if name in self.numbers else "x"


ALERT_FIELDS = FieldSet(
    text=frozenset({"alertname", "severity", "instance", "job", "status", "status_icon",
                    "level", "level_status", "starts_at", "starts_short", "zone",
                    "ends_at", "duration", "summary", "description", "other_labels",
                    "generator_url", "silence_url", "external_url", "runbook_url",
                    "dashboard_url", "links", "fingerprint", "receiver", "history",
                    "group_labels", "values"}),
    maps=frozenset({"labels", "annotations", "common_labels"}))
TITLE_FIELDS = FieldSet(
    text=frozenset({"state", "tag", "level", "receiver", "alertnames", "group_labels",
                    "external_url", "part"}),
    numbers=frozenset({"firing", "resolved", "count"}),
    maps=frozenset({"common_labels"}))
DASHBOARD_FIELDS = replace(ALERT_FIELDS, text=ALERT_FIELDS.text - {"dashboard_url", "links",
                                                                     "history"})
MAX_FIELD_WIDTH = 200   # a width or precision in a format spec: one field never grows a message
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[([^\[\]{}]*)\])?")
_SPEC_NUMBERS = re.compile(r"[0-9]+")
_formatter = string.Formatter()


@functools.lru_cache(maxsize=256)
def field_name(name):
    """'labels[team]' -> ('labels', 'team'); 'summary' -> ('summary', None); None for
    anything else a str.format field could be (attributes, several indexes, positions)."""
    match = _FIELD.fullmatch(name or "")
    return match.groups() if match else None


@functools.lru_cache(maxsize=256)
def spec_allowed(spec):
    """Whether a format spec is bounded: no width or precision over MAX_FIELD_WIDTH, no
    nested field."""
    return "{" not in spec and all(int(n) <= MAX_FIELD_WIDTH
                                   for n in _SPEC_NUMBERS.findall(spec))


@functools.lru_cache(maxsize=64)
def _parsed(template):
    """A template's lines, each as str.format parses it: (literal, field, spec, conversion)."""
    return tuple(tuple(_formatter.parse(line)) for line in template.split("\n"))


def _format(name, spec, conversion, fields, escape):
    parsed = field_name(name)
    if parsed is None or not spec_allowed(spec):    # refused at load: never rendered
        return ""
    base, key = parsed
    value = fields[base]
    if key is not None:
        value = value[key] if isinstance(value, dict) else ""
    if spec == "raw":
        return str(value)
    if isinstance(value, Untrusted):
        value = escape(value)
    if not spec and not conversion:
        return str(value)
    try:
        return _formatter.format_field(_formatter.convert_field(value, conversion), spec)
    except (ValueError, TypeError):  # e.g. {x:d} on a label that is not a number
        return str(value)


def render_template(template, fields, escape="markdown"):
    """str.format over `fields`; a missing field is empty, and a line whose placeholders all
    came out empty is left out (so 'Resolved: {ends_at}' disappears while an alert fires).
    Alert text (Untrusted) is escaped for `escape` (markdown, url, or None), unless a field
    says `:raw`. The template must have passed template_errors()."""
    out, escape = [], ESCAPES[escape]
    for pieces in _parsed(template):
        parts, named, filled = [], False, False
        for literal, name, spec, conversion in pieces:
            parts.append(literal)
            if name is not None:
                value = _format(name, spec, conversion, fields, escape)
                named, filled = True, filled or value != ""
                parts.append(value)
        if named and not filled:
            continue
        out.append("".join(parts))
    return "\n".join(out)


def template_errors(template, allowed):
    """What is wrong with a template whose fields come from the FieldSet `allowed`, one line
    each, numbered from 1: a malformed line; a field that is not a plain name with at most one
    [key]; a name no alert can have (with the closest one); a map without its key, or a key on
    text; a format spec that is unbounded or does not apply to the field's type."""
    errors = []
    for number, line in enumerate(template.split("\n"), 1):
        try:
            pieces = list(_formatter.parse(line))
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        for _, name, spec, conversion in pieces:
            if name is not None:
                problem = _field_error(name, spec, conversion, allowed)
                if problem:
                    errors.append(f"line {number}: {problem}")
    return errors


def _field_error(name, spec, conversion, allowed):
    shown = "{" + name + "}"
    parsed = field_name(name)
    if parsed is None:
        return (f"{shown}: a field is a name, or a name and one [key] such as {{labels[team]}}"
                if name else "{}: name the field, such as {alertname}")
    base, key = parsed
    if base not in allowed.names():
        close = difflib.get_close_matches(base, sorted(allowed.names()), 1)
        return (f"{shown} is not a field" + (f"; did you mean {{{close[0]}}}?" if close else "")
                + f" (fields: {', '.join(sorted(allowed.names()))})")
    if base in allowed.maps and key is None:
        return f"{shown} needs a key, such as {{{base}[team]}}"
    if base not in allowed.maps and key is not None:
        return f"{shown}: only {', '.join(sorted(allowed.maps))} take a [key]"
    if not spec_allowed(spec):
        return f"{shown}: a format width or precision is at most {MAX_FIELD_WIDTH}"
    if spec and spec != "raw":
        try:
            _formatter.format_field(_formatter.convert_field(allowed.sample(base), conversion),
                                    spec)
        except (ValueError, TypeError) as exc:
            kind = "a number" if base in allowed.numbers else "text"
            return f"{shown}: format {spec!r} does not apply to {kind} ({exc})"
    return None


# =============================================================================================
# 3. Config
# =============================================================================================
#
# One frozen dataclass per section of config.ini. A field is named as its key, and its default
# is the key's default: written here once (docs/configuration.md's tables are checked against
# them). A default of "" on a path means "derived" (see load_config). Field metadata: "min" for
# numbers, "choices" for words, "secret" for credentials (read from a file or the environment),
# "duration" for durations (seconds; written 90, 90s, 10m, 4h, 1d: see duration_seconds).

# The built-in words of messages, by `language`: zh by default, as the groups alertbridge pages
# read Chinese first; en for international teams; both for groups that mix them (each word
# twice, longer lines). Level and state words (CRITICAL, FIRING) stay as Alertmanager writes
# them: they are what on-call searches for.
LANGUAGES = ("zh", "en", "both")
WORDS = {
    "zh": {"instance": "实例", "started": "开始", "history": "历史", "resolved": "恢复",
           "lasted": "持续", "summary": "摘要", "description": "描述", "labels": "标签",
           "silence": "静默", "runbook": "手册", "dashboard": "仪表盘", "digest": "汇总",
           "values": "数值", "image": "截图",
           "nth": "24 小时内第 {n} 次", "last_resolved": "上次 {when} 恢复，持续 {lasted}",
           "claim": "我来处理", "claimed": "✅ {name} 认领了 {title}（告警后 {after}）",
           "escalated": "⏫ 升级第 {step} 步：{title} 已等待 {waited}，无人认领",
           "silence_for": "静默…", "silenced": "🔕 {name} 静默了 {title} {hours} 小时",
           "has_it": "✅ {name} 已认领（告警后 {after}）", "resolved_card": "✅ 已恢复",
           "silenced_card": "🔕 {name} 静默 {hours} 小时",
           "card_mention": "📣 {title}（告警卡片见上）", "more": "…另有 {count} 条",
           "and": "；", "colon": "："},
    "en": {"instance": "Instance", "started": "Started", "history": "History",
           "resolved": "Resolved", "lasted": "lasted", "summary": "Summary",
           "description": "Description", "labels": "Labels", "silence": "Silence",
           "runbook": "Runbook", "dashboard": "Dashboard", "digest": "digest",
           "values": "Values", "image": "Image",
           "nth": "{ordinal} time in 24 h", "last_resolved": "last resolved {when} after {lasted}",
           "claim": "Claim", "claimed": "✅ {name} claimed {title}, {after} after the page",
           "escalated": "⏫ Escalation step {step}: {title} has waited {waited}, unclaimed",
           "silence_for": "Silence…", "silenced": "🔕 {name} silenced {title} for {hours} h",
           "has_it": "✅ {name} has it, {after} after the page", "resolved_card": "✅ Resolved",
           "silenced_card": "🔕 Silenced for {hours} h by {name}",
           "card_mention": "📣 {title} (its card is above)", "more": "… and {count} more",
           "and": "; ", "colon": ": "},
}
WORDS["both"] = {key: zh if zh == WORDS["en"][key] or key in ("and", "colon", "lasted")
                 else f"{zh} {WORDS['en'][key]}" for key, zh in WORDS["zh"].items()}
WORDS["both"].update(claimed=WORDS["zh"]["claimed"] + " · " + WORDS["en"]["claimed"][2:],
                     escalated=WORDS["zh"]["escalated"] + " · " + WORDS["en"]["escalated"][2:],
                     silenced=WORDS["zh"]["silenced"] + " · " + WORDS["en"]["silenced"][2:],
                     has_it=WORDS["zh"]["has_it"] + " · " + WORDS["en"]["has_it"][2:],
                     resolved_card=WORDS["zh"]["resolved_card"] + " · Resolved",
                     silenced_card=WORDS["zh"]["silenced_card"] + " · "
                     + WORDS["en"]["silenced_card"][2:],
                     card_mention=WORDS["zh"]["card_mention"] + " · "
                     + WORDS["en"]["card_mention"][2:],
                     lasted="持续", nth="24 小时内第 {n} 次 · {ordinal} time in 24 h",
                     last_resolved="上次 {when} 恢复，持续 {lasted} · last resolved {when} after "
                                   "{lasted}", colon=": ", **{"and": "; "})

DEFAULT_TITLE = "[{tag}] {group_labels}"
DEFAULT_ALERT_LINES = """\
**{{status_icon}} {{alertname}}** · {{level_status}}
- {instance}{colon}{{instance}}
- {started}{colon}{{starts_at}} {{zone}}
- {history}{colon}{{history}}
- {resolved}{colon}{{ends_at}} ({lasted} {{duration}})
- {summary}{colon}{{summary}}
- {description}{colon}{{description}}
- {values}{colon}{{values}}
- {labels}{colon}{{other_labels}}
- {{links}}"""
DEFAULT_ALERTS = {language: DEFAULT_ALERT_LINES.format(**words)
                  for language, words in WORDS.items()}
DEFAULT_ALERT = DEFAULT_ALERTS["zh"]
DEFAULT_COMPACT = "- {status_icon} **{alertname}** {instance} · {level_status} · {starts_short}"

PLACEHOLDER_TOKEN = "CHANGE_ME"
MOBILE = re.compile(r"(\+[0-9]{1,4}-)?[0-9]{5,15}")       # as DingTalk's atMobiles take them
USER_ID = re.compile(r"(?!all$)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.I)   # "all" is no person


def is_user_id(word):
    """A user id of some platform: DingTalk's as it is, another channel's as KIND:ID."""
    kind, qualified, bare = word.rpartition(":")
    return bool(USER_ID.fullmatch(bare)) and (not qualified or kind in CHANNELS)
MENTIONS_FROM_ALERTS = 20   # at most this many @ taken from alerts' labels, per message
LOG_FORMATS = ("text", "json")


def _words(value):
    return tuple(w for w in re.split(r"[\s,]+", value or "") if w)


# Zones without daylight saving time that work even where the IANA database is missing (a
# minimal container without tzdata): China's own among them, so the default always loads.
FIXED_ZONES = {"Asia/Shanghai": 8, "Asia/Chongqing": 8, "Asia/Harbin": 8, "Asia/Urumqi": 6,
               "PRC": 8, "Asia/Hong_Kong": 8, "Asia/Macau": 8, "Asia/Taipei": 8,
               "Asia/Singapore": 8, "Asia/Tokyo": 9, "Asia/Seoul": 9, "UTC": 0, "Etc/UTC": 0}


def load_timezone(name):
    """IANA name (zoneinfo), UTC, or a fixed offset such as +08:00."""
    match = re.fullmatch(r"(?:UTC)?([+-])([0-9]{2}):?([0-9]{2})", name)
    if match:
        sign = -1 if match.group(1) == "-" else 1
        return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))
    try:
        from zoneinfo import ZoneInfo
        return ZoneInfo(name)
    except Exception:  # no such zone, or no time zone database on this host
        if name in FIXED_ZONES:
            return timezone(timedelta(hours=FIXED_ZONES[name]), name)
        raise ConfigError(f"[alertbridge] timezone: unknown time zone {name!r} (an IANA name "
                          f"such as Asia/Shanghai, UTC, or an offset such as +08:00)")


DURATION_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"     # ASCII digits: no ², no ٣
DURATION_PIECE = re.compile(f"({DURATION_NUMBER})(ns|us|µs|ms|s|m|h|d)")
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600,
                  "d": 86400}
DURATION_FORMS = "90, 90s, 10m, 4h or 1d"      # what an error asks for


def duration_seconds(value):
    """A duration as people write it, in seconds, or None if it is none. The one reader of
    every duration a user writes (config keys, escalation steps, a command's `silence N 2d`,
    the imported YAML's timeout), so all take the same forms: seconds alone (90, 0.5), or
    numbers with units as Go and Prometheus write them, and days (90s, 10m, 4h, 1d, 1h30m,
    1.5h, 500ms)."""
    text = value.strip() if isinstance(value, str) else ""
    if re.fullmatch(DURATION_NUMBER, text):
        seconds = float(text)
    else:
        pieces = DURATION_PIECE.findall(text)
        if not pieces or "".join(n + u for n, u in pieces) != text:
            return None
        seconds = sum(float(n) * DURATION_UNITS[u] for n, u in pieces)
    return seconds if seconds < float("inf") else None      # 400 digits are no duration


def duration_field(default, minimum=0.0):
    """A dataclass field of config.ini that is a duration: read by _Section.duration."""
    return field(default=default, metadata={"min": minimum, "duration": True})


@dataclass(frozen=True)
class Service:
    """[alertbridge]"""
    listen: str = "127.0.0.1"
    port: int = field(default=9097, metadata={"max": 65535})
    max_body_bytes: int = field(default=1048576, metadata={"min": 1024})
    request_timeout: float = duration_field(10.0, minimum=0.1)
    max_connections: int = field(default=512, metadata={"min": 1})
    timezone: str = "Asia/Shanghai"
    state_dir: str = ""         # "": $STATE_DIRECTORY, else "state"
    journal: str = ""           # "": STATE_DIR/journal.db
    journal_sync: str = field(default="full", metadata={"choices": ("full", "normal")})
    default_receiver: str = ""
    log_format: str = field(default="text", metadata={"choices": LOG_FORMATS})


@dataclass(frozen=True)
class Database:
    """[database]: the alert history."""
    driver: str = field(default="sqlite", metadata={"choices": ("sqlite", "mysql")})
    path: str = ""              # "": STATE_DIR/alertbridge.db
    host: str = "127.0.0.1"
    port: int = field(default=3306, metadata={"min": 1, "max": 65535})
    user: str = "alertbridge"
    password: str = field(default="", repr=False, metadata={"secret": True})
    database: str = "alertbridge"
    retention_days: float = 180.0

    def describe(self):
        if self.driver == "sqlite":
            return f"sqlite:{self.path}"
        return f"mysql://{self.user}@{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class Auth:
    """[auth]: the credentials Alertmanager's http_config must present."""
    bearer_token: str = field(default="", repr=False, metadata={"secret": True})
    username: str = ""
    password: str = field(default="", repr=False, metadata={"secret": True})
    protect_metrics: bool = False

    @property
    def enabled(self):
        return bool(self.bearer_token or self.username)

    def allows(self, authorization):
        """Whether an Authorization header value carries valid credentials (constant time)."""
        scheme, _, value = (authorization or "").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.bearer_token:
            # http.server decodes headers as Latin-1; Alertmanager sends the token's UTF-8 bytes
            return hmac.compare_digest(value.encode("latin-1"), self.bearer_token.encode())
        if scheme.lower() == "basic" and self.username:
            try:
                given = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            expected = f"{self.username}:{self.password}".encode()
            return hmac.compare_digest(given, expected)
        return False


@dataclass(frozen=True)
class Delivery:
    """[delivery]"""
    rate_limit: int = field(default=20, metadata={"min": 1})
    rate_window: float = duration_field(60.0, minimum=0.01)
    throttle_seconds: float = duration_field(600.0)
    max_message_bytes: int = field(default=20000, metadata={"min": 1000})
    max_age: float = duration_field(86400.0, minimum=1.0)
    timeout: float = duration_field(5.0, minimum=0.1)
    retry_base: float = duration_field(2.0, minimum=0.01)
    retry_max: float = duration_field(300.0, minimum=0.01)
    reserve: int = 2                    # slots per robot and window only reserve_for may use
    priority_label: str = "severity"    # the defaults of every [receiver:NAME]
    priority_order: str = "critical, error, warning, info"
    reserve_for: str = "critical"


@dataclass(frozen=True)
class Cluster:
    """[cluster]: several instances on one MySQL history, each page sent once."""
    enabled: bool = False
    instance: str = ""          # "": the host's name
    instances: int = field(default=2, metadata={"min": 1})
    lease: float = duration_field(30.0, minimum=1.0)
    duplicate_window: float = duration_field(300.0)
    presumed_alone: float = duration_field(3600.0)  # silent this long: no longer presumed alone


@dataclass(frozen=True)
class Templates:
    """[templates]: the layout every route has unless it sets its own. An alert template left
    unset is the built-in one of the route's language."""
    language: str = field(default="zh", metadata={"choices": LANGUAGES})
    title: str = DEFAULT_TITLE
    alert: str = ""                 # "": DEFAULT_ALERTS[language]
    compact: str = DEFAULT_COMPACT  # the alerts of a message after its first compact_after
    compact_after: int = 5          # 0: every alert in full


@dataclass(frozen=True)
class Robot:
    """[robot:NAME]: one group robot, of a channel's `kind` (CHANNELS: how its URL carries its
    credential, how it is signed, its limits and answers). Only `name` reaches logs, metrics
    or databases."""
    name: str
    url: str = field(repr=False)
    secret: str = field(default="", repr=False)
    keyword: str = ""
    kind: str = DEFAULT_KIND
    rate_limit: tuple = ()      # (count, seconds) windows of its own: its channel's if none

    @functools.cached_property
    def token(self):
        """Its credential, as its channel reads it from the URL."""
        return CHANNELS[self.kind].credential(self.url)

    @property
    def placeholder(self):
        return bool(self.placeholder_key)

    @property
    def placeholder_key(self):
        """"token" or "secret" if it still has an example's value (config.ini's, the docs'),
        which its channel lists; else ""."""
        examples = CHANNELS[self.kind].PLACEHOLDERS
        return next((key for key in ("token", "secret") if getattr(self, key) in examples[key]),
                    "")

    @property
    def placeholder_words(self):
        """What --send-test and the log say of a placeholder (the example's value, no secret)."""
        if self.placeholder_key == "token":
            return f"its url still has the placeholder token {self.token}"
        return f"its secret is still the placeholder {self.secret}"

    @functools.cached_property
    def key(self):
        """The robot as its platform knows it, its credential, hashed: budgets and throttles
        belong to it."""
        return hashlib.sha256(self.token.encode()).hexdigest()[:16]

    def redact(self, text):
        """`text` with this robot's token and secret masked."""
        for secret in (self.token, self.secret):
            if secret:
                text = text.replace(secret, "***")
        return text


@dataclass(frozen=True)
class OnCall:
    """[oncall]: the links on pages that act on an incident (claim it), signed with
    link_secret, on a base URL the team's phones can reach."""
    base_url: str = ""              # https://alertbridge.example.com: where links point
    link_secret: str = field(default="", repr=False, metadata={"secret": True})
    link_ttl: float = duration_field(604800.0, minimum=60)   # a week
    alertmanager_api: str = ""      # http://127.0.0.1:9093: where alertbridge makes silences
    follow_interval: float = duration_field(30.0, minimum=1)    # silenced incidents
    silence_max: float = duration_field(86400.0, minimum=60)   # the longest from the app


@dataclass(frozen=True)
class App:
    """[app]: a DingTalk enterprise internal app (企业内部应用) with a robot, for receivers that
    set app_group: pages as interactive cards whose buttons call back over the app's Stream
    connection (no public address), claims by the clicker's DingTalk user id, commands typed
    to the robot. The custom robots stay the fallback."""
    client_id: str = ""             # the app's Client ID (AppKey)
    client_secret: str = field(default="", repr=False, metadata={"secret": True})
    robot_code: str = ""            # the app robot's code: the Client ID unless set
    card_template: str = ""         # the id of the card template (docs/dingtalk-app.md)
    api_url: str = "https://api.dingtalk.com"       # DingTalk's OpenAPI, and its Stream gateway
    timeout: float = duration_field(10.0, minimum=1)
    ding: str = field(default="none", metadata={"choices": ("none", "app", "sms", "call")})

    @property
    def enabled(self):
        return bool(self.client_id and self.client_secret)

    @property
    def robot(self):
        return self.robot_code or self.client_id


@dataclass(frozen=True)
class Person:
    """[person:HANDLE]: someone alertbridge can @-mention and put on call. `handle` is how the
    config names them (at_people, rotations, at_map); `name` is how messages and pages do."""
    handle: str
    name: str
    mobile: str = ""
    user_id: str = ""               # DingTalk's
    ids: tuple = ()                 # (kind, id): another channel's, by its PERSON_KEY

    @property
    def user_ids(self):
        """Every platform's id of this person, as Mentions carries them."""
        return ((self.user_id,) if self.user_id else ()) + tuple(f"{k}:{i}" for k, i in self.ids)


SHIFTS = {"daily": 1, "weekly": 7}


@dataclass(frozen=True)
class Rotation:
    """[rotation:NAME]: people on call in turn, one shift each (a day or a week), handed over at
    a time of day in [alertbridge] timezone, from a start date; overrides put someone else on
    call for a span of time. See on_call()."""
    name: str
    people: tuple                   # Person, in turn
    start: date                     # the first shift begins at hand_over_at of this day
    hand_over_at: dtime = dtime(9, 30)
    shift: str = "weekly"
    overrides: tuple = ()           # ((from epoch, until epoch, Person), ...): the last listed wins

    @property
    def days(self):
        return SHIFTS[self.shift]


@dataclass(frozen=True)
class Step:
    """One step of an escalation: `after` seconds since the page, who to @ (people, whoever is
    on call in a rotation) and which other receivers' groups hear it too."""
    after: float
    people: tuple = ()
    routes: tuple = ()              # route names


@dataclass(frozen=True)
class Escalation:
    """[escalation:NAME]: what happens while nobody claims a page: its steps in order, the
    whole chain again `repeat` more times (each round as long as the last step's delay)."""
    name: str
    steps: tuple
    repeat: int = 0


@dataclass(frozen=True)
class Route:
    """[receiver:NAME]: where an Alertmanager receiver's alerts go (its robots, used in turn)
    and how they look. In the code a "receiver" is always Alertmanager's; the section that
    serves one is its route, named like it (or the default_receiver's, for unknown ones)."""
    name: str
    robots: tuple
    at_mobiles: tuple = ()
    at_user_ids: tuple = ()
    at_all: bool = False
    at_severities: tuple = ()
    at_mobiles_from: tuple = ()     # labels or annotations whose values are phone numbers to @
    at_user_ids_from: tuple = ()    # ... DingTalk user ids to @
    at_map_label: str = ""          # a label whose value picks entries of at_map
    at_map: tuple = ()              # ((label value, mobiles, user ids, people), ...)
    at_people: tuple = ()           # Person and Rotation: a person, whoever is on call
    claim_links: bool = False       # a Claim link on firing pages ([oncall])
    app_group: str = ""             # the openConversationId of a group the [app] robot is in
    escalation: Escalation = None   # what happens while nobody claims a page
    escalate_levels: tuple = ("critical",)
    per_alert: bool = False
    send_resolved: bool = True
    message_type: str = "markdown"  # or actionCard: the same text with buttons
    dashboard_url: str = ""         # a template over an alert's fields: its dashboard button
    prometheus_url: str = ""        # the base put in place of generatorURL's
    alertmanager_url: str = ""      # the base put in place of externalURL
    language: str = Templates.language
    title: str = DEFAULT_TITLE
    alert: str = DEFAULT_ALERT
    compact: str = DEFAULT_COMPACT
    compact_after: int = Templates.compact_after
    priority_label: str = Delivery.priority_label
    priority_order: tuple = _words(Delivery.priority_order)
    reserve_for: tuple = _words(Delivery.reserve_for)

    def level(self, alert):
        """(rank, name) of an alert's priority: where its priority_label's value stands in
        priority_order, 0 the highest. Any other value, or none, ranks last, as NO_LEVEL."""
        value = alert["labels"].get(self.priority_label, "").lower()
        if value in self.priority_order:
            return self.priority_order.index(value), value
        return len(self.priority_order), NO_LEVEL

    def urgent(self, level):
        """Whether messages of this level may use the robots' reserved slots."""
        return level in self.reserve_for

    def fingerprint(self):
        """The route and its robots (their URLs and secrets too), hashed: how --send-test tells
        whether a running daemon's route is the one its config file has."""
        credentials = [(robot.url, robot.secret) for robot in self.robots]
        return hashlib.sha256(repr((self, credentials)).encode()).hexdigest()[:16]


DEFAULT_ROUTE = Route("", ())     # a route's defaults, for what renders without one


@dataclass(frozen=True)
class Config:
    path: str = ""
    service: Service = Service()
    database: Database = Database()
    auth: Auth = Auth()
    delivery: Delivery = Delivery()
    cluster: Cluster = Cluster()
    oncall: OnCall = OnCall()
    app: App = App()
    routes: dict = field(default_factory=dict)     # route name -> Route
    people: dict = field(default_factory=dict)     # handle -> Person
    rotations: dict = field(default_factory=dict)  # rotation name -> Rotation
    tz: object = load_timezone(Service.timezone)    # service.timezone, loaded

    def name_of(self, handle):
        """How pages and messages name someone: their [person] name, else the handle (or
        DingTalk user id) itself."""
        person = self.people.get(handle)
        return person.name if person else handle

    def route_for(self, receiver):
        """The route of an Alertmanager receiver: its own section, else default_receiver's."""
        return self.routes.get(receiver) or self.routes.get(self.service.default_receiver)

    @property
    def robots(self):
        return {r for route in self.routes.values() for r in route.robots}

    @functools.cached_property
    def robot_windows(self):
        """Robot key -> the (count, seconds) windows its budget is counted in (windows_of)."""
        return {robot.key: windows_of(robot, self.delivery) for robot in self.robots}

    @property
    def budget_windows(self):
        """windows(robot key), for the robot pool: robot_windows, and [delivery]'s for a key
        no robot has."""
        default = ((self.delivery.rate_limit, self.delivery.rate_window),)
        return lambda key: self.robot_windows.get(key, default)

    @property
    def longest_window(self):
        """The longest window any robot's budget is counted in (seconds)."""
        return max([self.delivery.rate_window] +
                   [windows[0][1] for windows in self.robot_windows.values()])

    @property
    def send_log_span(self):
        """How far back a send still counts: the longest window, or the longest throttle."""
        return max(self.longest_window, self.delivery.throttle_seconds)


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Section:
    """Typed reads from one config section, with errors that name the key."""

    def __init__(self, parser, name, base=""):
        self.name, self.base = name, base      # base: the directory relative paths start from
        self.items = parser[name] if parser.has_section(name) else {}

    @classmethod
    def of(cls, name, items):
        """A section of given items, to read a value the way a key is read."""
        section = cls.__new__(cls)
        section.name, section.base, section.items = name, "", items
        return section

    def get(self, key, default=""):
        return self.items[key].strip() if key in self.items else default

    def number(self, key, default, kind, minimum=0, maximum=None):
        if key not in self.items:
            return default
        try:
            value = kind(self.items[key].strip())
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"[{self.name}] {key}: not {what}")
        if not value == value or value in (float("inf"), float("-inf")):   # nan, inf
            raise ConfigError(f"[{self.name}] {key}: not a finite number")
        if value < minimum:
            raise ConfigError(f"[{self.name}] {key}: must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"[{self.name}] {key}: must be at most {maximum}")
        return value

    def duration(self, key, default, minimum=0.0):
        """A duration key, in seconds: any form duration_seconds reads."""
        if key not in self.items:
            return default
        seconds = duration_seconds(self.items[key])
        if seconds is None:
            raise ConfigError(f"[{self.name}] {key}: not a duration (write {DURATION_FORMS})")
        if seconds < minimum:
            raise ConfigError(f"[{self.name}] {key}: must be at least {minimum:g} seconds")
        return seconds

    def bool(self, key, default=False):
        value = self.get(key, "").lower()
        if not value:
            return default
        if value in ("1", "yes", "true", "on"):
            return True
        if value in ("0", "no", "false", "off"):
            return False
        raise ConfigError(f"[{self.name}] {key}: not a boolean (true or false)")

    def secret(self, key, default=""):
        """A credential: the key's value, or the first line of the file `KEY_file` names (such
        as one systemd's LoadCredential= puts in $CREDENTIALS_DIRECTORY), not both. Either may
        name environment variables as ${NAME}. Errors name the key, the variable or the file,
        never the value."""
        from_file = f"{key}_file"
        if key in self.items and from_file in self.items:
            raise ConfigError(f"[{self.name}] {key}, {from_file}: set one of them, not both")
        if from_file not in self.items:
            return self.expand(key, self.get(key, default))
        path = os.path.join(self.base, self.expand(from_file, self.get(from_file)))
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"[{self.name}] {from_file}: cannot read {path}: "
                              f"{exc.strerror or type(exc).__name__}")
        return lines[0].strip() if lines else ""

    def expand(self, key, value):
        """`value` with each ${NAME} replaced by the environment's NAME, which must be set."""
        def variable(match):
            if match.group(1) not in os.environ:
                raise ConfigError(f"[{self.name}] {key}: the environment has no "
                                  f"{match.group(1)}")
            return os.environ[match.group(1)].strip()
        return ENV_REFERENCE.sub(variable, value)

    def template(self, key, default, allowed):
        """A template over the FieldSet `allowed`; a default is not checked again: it is
        [templates]' (checked there) or the built-in one."""
        if key not in self.items:
            return default
        text = self.items[key].strip("\n")
        errors = template_errors(text, allowed)
        if errors:
            raise ConfigError(f"[{self.name}] {key}: bad template: {'; '.join(errors)}")
        return text

    def settings(self, cls, **derived):
        """The section as `cls`: each field read by its type, its default when the key is unset."""
        values = {}
        for f in fields(cls):
            if f.name in derived or f.default is MISSING:
                continue
            if f.metadata.get("secret"):
                values[f.name] = self.secret(f.name, f.default)
            elif f.type is bool:
                values[f.name] = self.bool(f.name, f.default)
            elif f.metadata.get("duration"):
                values[f.name] = self.duration(f.name, f.default, f.metadata["min"])
            elif f.type in (int, float):
                values[f.name] = self.number(f.name, f.default, f.type, f.metadata.get("min", 0),
                                             f.metadata.get("max"))
            else:
                values[f.name] = self.get(f.name, f.default)
                choices = f.metadata.get("choices")
                if choices and values[f.name].lower() not in choices:
                    raise ConfigError(f"[{self.name}] {f.name}: must be one of "
                                      f"{', '.join(choices)}")
        return cls(**values, **derived)


SECTIONS = ("alertbridge", "database", "delivery", "templates", "auth", "cluster", "oncall", "app")
SECTION_KINDS = ("robot:", "receiver:", "person:", "rotation:", "escalation:")


def _section_hint(name):
    """What an unknown section may have meant: the known one a typo away, else the kinds."""
    kind, colon, rest = name.partition(":")
    close = (difflib.get_close_matches(kind + ":", SECTION_KINDS, n=1) if colon else
             difflib.get_close_matches(name, SECTIONS, n=1))
    if close:
        return f"did you mean [{close[0]}{rest}]?"
    return ("expected receiver:NAME, robot:NAME, person:HANDLE, rotation:NAME or "
            "escalation:NAME")


def read_config_text(path):
    """config.ini's text: UTF-8, with or without the BOM Windows Notepad writes; a file in
    another encoding is named by its first line that is not UTF-8."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 (saved as GBK?): save the file as "
                          f"UTF-8") from None


class ConfigErrors:
    """Every error of one config file, each once, in the order found. A section that failed
    is not named again by what depends on it (a receiver listing a robot whose section has an
    error is not also told the robot has no section)."""

    def __init__(self):
        self.lines, self.failed = [], set()

    def add(self, line):
        """An error, unless it only says that a failed section does not exist."""
        if not any(f"no section [{name}]" in line for name in self.failed):
            self.lines.append(line)

    def run(self, load, *args, default=None, section=None):
        """load(*args), or `default` if it raises ConfigError (its lines added)."""
        try:
            return load(*args)
        except ConfigError as exc:
            if section:
                self.failed.add(section)
            for line in exc.lines:
                self.add(line)
            return default

    def each(self, parser, kind, load):
        """{NAME: load(section name, NAME)} for every [KIND:NAME] that loads."""
        loaded = {s[len(kind):]: self.run(load, s, s[len(kind):], section=s)
                  for s in parser.sections() if s.startswith(kind)}
        return {name: value for name, value in loaded.items() if value is not None}

    def check(self):
        if self.lines:
            raise ConfigError("\n".join(self.lines))


def load_config(path):
    """Read and validate config.ini. Raises ConfigError naming every problem found, a line
    each (a syntax error alone: the rest cannot be read)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(read_config_text(path), source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {_syntax_error(exc)}")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}")
    errors = ConfigErrors()
    for name in parser.sections():
        if name not in SECTIONS and not name.startswith(SECTION_KINDS):
            errors.add(f"[{name}]: unknown section ({_section_hint(name)})")
        else:
            errors.run(_refuse_unknown_keys, parser, name)
    base = os.path.dirname(os.path.abspath(path))
    service = errors.run(_load_service, parser, base, default=Service())
    settings = dict(path=os.path.abspath(path), service=service,
                    tz=errors.run(load_timezone, service.timezone, default=timezone.utc),
                    database=errors.run(_load_database, parser, base, service,
                                        default=Database()),
                    auth=errors.run(_load_auth, parser, base, default=Auth()),
                    delivery=errors.run(_load_delivery, parser, default=Delivery()))
    settings["cluster"] = errors.run(_load_cluster, parser, settings["database"],
                                     default=Cluster())
    settings["oncall"] = errors.run(_load_oncall, parser, base, default=OnCall())
    settings["app"] = errors.run(_load_app, parser, base, default=App())
    templates = errors.run(_load_templates, parser, default=Templates())
    robots = errors.each(parser, "robot:", lambda s, n: _load_robot(_Section(parser, s, base), n))
    people = errors.each(parser, "person:", lambda s, n: _load_person(_Section(parser, s), n))
    rotations = errors.each(parser, "rotation:", lambda s, n: _load_rotation(
        _Section(parser, s), n, people, settings["tz"]))
    directory = (people, rotations)
    escalations = errors.each(parser, "escalation:", lambda s, n: _load_escalation(
        _Section(parser, s), n, *directory))
    routes = errors.each(parser, "receiver:", lambda s, n: _load_route(
        _Section(parser, s), n, robots, templates, settings["delivery"], directory,
        escalations))
    for line in _cross_checks(settings, escalations, routes, errors.failed):
        errors.add(line)
    errors.check()
    return Config(routes=routes, people=people, rotations=rotations, **settings)


def _cross_checks(settings, escalations, routes, failed):
    """What one section's settings require of another's: each an error line."""
    for escalation in escalations.values():
        for route in (r for step in escalation.steps for r in step.routes if r not in routes):
            yield f"[escalation:{escalation.name}] steps: no section [receiver:{route}]"
    if not routes and not any(name.startswith("receiver:") for name in failed):
        yield "no [receiver:NAME] section: at least one receiver is needed"
    linked = [name for name, route in sorted(routes.items()) if route.claim_links]
    if linked and not (settings["oncall"].base_url and settings["oncall"].link_secret):
        yield (f"[receiver:{linked[0]}] claim_links: set [oncall] base_url (where phones reach "
               f"alertbridge) and link_secret (which signs the links; {MAKE_LINK_SECRET})")
    carded = [name for name, route in sorted(routes.items()) if route.app_group]
    if carded and not (settings["app"].enabled and settings["app"].card_template):
        yield (f"[receiver:{carded[0]}] app_group: set [app] client_id, client_secret and "
               f"card_template (docs/dingtalk-app.md)")
    default = settings["service"].default_receiver
    if default and default not in routes:
        yield f"[alertbridge] default_receiver: no section [receiver:{default}]"


def _keys(cls, without=()):
    """The keys of the section `cls` reads: its fields, and KEY_file for each credential."""
    return ({f.name for f in fields(cls)} - set(without)
            | {f"{f.name}_file" for f in fields(cls) if f.metadata.get("secret")})


ROBOT_KEYS = {"url", "secret", "secret_file", "token", "token_file", "keyword", "kind",
              "rate_limit"}
PERSON_KEYS = {"name", "mobile"}    # and each channel's PERSON_KEY (person_keys)
ROTATION_KEYS = {"people", "start", "hand_over_at", "shift", "overrides"}
ESCALATION_KEYS = {"steps", "repeat"}


def _refuse_unknown_keys(parser, name):
    """A key no section has is an error: a typo (at_mobile) would otherwise be ignored, and its
    setting silently not in effect. Keys of [DEFAULT] go to every section and are not judged."""
    sections = {"alertbridge": Service, "database": Database, "auth": Auth,
                "delivery": Delivery, "cluster": Cluster, "templates": Templates,
                "oncall": OnCall, "app": App}
    kinds = {"robot:": ROBOT_KEYS, "person:": person_keys(), "rotation:": ROTATION_KEYS,
             "escalation:": ESCALATION_KEYS}
    known = (_keys(sections[name]) if name in sections else
             next((keys for prefix, keys in kinds.items() if name.startswith(prefix)), None)
             or _keys(Route, without=("name",)))
    for key in sorted(set(parser[name]) - set(parser.defaults()) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"[{name}] {key}: unknown key{hint}")


def _syntax_error(exc):
    """configparser's complaint, by line number: its own text quotes the line, which may hold a
    secret, and ends up in logs and in the answer to POST /-/reload."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno}: a setting before any [section] header"
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(str(number) for number, _ in exc.errors)
        return f"line {lines}: neither 'key = value', a [section] header nor a comment"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"line {exc.lineno}: [{exc.section}] {exc.option} is set twice"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"line {exc.lineno}: section [{exc.section}] appears twice"
    return type(exc).__name__


def _resolver(base):
    return lambda p: p if os.path.isabs(p) else os.path.join(base, p)


def _load_service(parser, base):
    resolve = _resolver(base)
    section = _Section(parser, "alertbridge")
    state_dir = resolve(section.get("state_dir") or os.environ.get("STATE_DIRECTORY", "state"))
    journal = resolve(section.get("journal") or os.path.join(state_dir, "journal.db"))
    service = section.settings(Service, state_dir=state_dir, journal=journal)
    return replace(service, journal_sync=service.journal_sync.lower(),
                   log_format=service.log_format.lower())


def _load_database(parser, base, service):
    section = _Section(parser, "database", base)
    path = _resolver(base)(section.get("path") or os.path.join(service.state_dir, "alertbridge.db"))
    database = section.settings(Database, path=path)
    return replace(database, driver=database.driver.lower())


def _load_auth(parser, base):
    auth = _Section(parser, "auth", base).settings(Auth)
    if auth.password and not auth.username:
        raise ConfigError("[auth] password: set username too (basic auth)")
    return auth


def _load_delivery(parser):
    section = _Section(parser, "delivery")
    delivery = section.settings(Delivery)
    if "reserve" not in section.items:     # a few slots of 20; none of a small budget
        delivery = replace(delivery, reserve=min(Delivery.reserve, delivery.rate_limit // 10))
    if delivery.reserve >= delivery.rate_limit:
        raise ConfigError("[delivery] reserve: must be less than rate_limit (the rest is for the "
                          "other messages)")
    return delivery


INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _load_cluster(parser, database):
    cluster = _Section(parser, "cluster").settings(Cluster)
    if cluster.enabled and database.driver != "mysql":
        raise ConfigError("[cluster] enabled: needs [database] driver = mysql, which every "
                          "instance shares (an SQLite history is one host's)")
    instance = cluster.instance or socket.gethostname()
    if cluster.enabled and not INSTANCE_NAME.fullmatch(instance):
        where = "" if cluster.instance else " (unset: the host's name)"
        raise ConfigError(f"[cluster] instance{where}: 1 to 64 letters, digits, dots, dashes or "
                          f"underscores, unique to each instance")
    return replace(cluster, instance=instance)


MAKE_LINK_SECRET = ("make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))' "
                    "> /etc/alertbridge/link.secret, then link_secret_file = that file")


def _load_oncall(parser, base):
    section = _Section(parser, "oncall", base)
    oncall = section.settings(OnCall)
    if oncall.link_secret and len(oncall.link_secret) < 16:
        raise ConfigError(f"[oncall] link_secret: at least 16 characters (it signs the links: "
                          f"anyone who knows it can make one; {MAKE_LINK_SECRET})")
    return replace(oncall, base_url=_base_url(section, "base_url"),
                   alertmanager_api=_base_url(section, "alertmanager_api"))


def _load_app(parser, base):
    section = _Section(parser, "app", base)
    app = section.settings(App)
    if bool(app.client_id) != bool(app.client_secret):
        raise ConfigError("[app] client_id and client_secret: set both (the app's credentials, "
                          "from its page in DingTalk's developer console)")
    return replace(app, api_url=_base_url(section, "api_url", path=False) or App.api_url)


def _load_templates(parser):
    section = _Section(parser, "templates")
    return Templates(language=_language(section, Templates.language),
                     title=section.template("title", Templates.title, TITLE_FIELDS),
                     alert=section.template("alert", Templates.alert, ALERT_FIELDS),
                     compact=section.template("compact", Templates.compact, ALERT_FIELDS),
                     compact_after=section.number("compact_after", Templates.compact_after, int))


def _language(section, default):
    language = section.get("language", default).lower()
    if language not in LANGUAGES:
        raise ConfigError(f"[{section.name}] language: must be one of {', '.join(LANGUAGES)}")
    return language


def _load_robot(section, name):
    # Errors name the key, never quote the value: the URL holds the token.
    url, where = section.expand("url", section.get("url")), f"[{section.name}] url"
    if "\n" in url:
        raise ConfigError(f"{where}: an indented line below it was read as part of url "
                          f"(configparser continues a value on indented lines): write every "
                          f"key at the start of its line")
    if re.search(r"\s", url):
        raise ConfigError(f"{where}: contains a space (a comment after the value? configparser "
                          f"keeps it as part of the value: put comments on a line of their own)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: must be the robot's webhook URL (https://...)")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}: the port is not a number from 0 to 65535")
    secret, token = section.secret("secret"), section.secret("token")
    for key, value in (("secret", secret), ("token", token)):
        if re.search(r"\s", value):
            raise ConfigError(f"[{section.name}] {key}: contains a space (a comment after the "
                              f"value?)")
    kind = section.get("kind") or channel_kind(url)
    if kind not in CHANNELS:
        raise ConfigError(f"[{section.name}] kind: one of {', '.join(sorted(CHANNELS))}")
    channel = CHANNELS[kind]
    if secret and not channel.SIGNS:
        raise ConfigError(f"[{section.name}] secret: {channel.NAME} robots do not sign: remove "
                          f"secret (its key in the URL is all it takes)")
    if token:       # the URL without its token, the token from a file or the environment
        url = channel.with_credential(url, token, where)
    robot = Robot(name=name, url=url, secret=secret, keyword=section.get("keyword"), kind=kind,
                  rate_limit=_rate_limit(section))
    if not robot.token:
        raise ConfigError(f"{where}: {channel.NO_CREDENTIAL} (or set token, token_file)")
    return robot


def _rate_limit(section):
    """[robot:NAME] rate_limit = COUNT/DURATION, ...: the windows a robot's platform counts in
    (Feishu's 100/1m, 5/1s), longest first; () when unset (its channel's)."""
    windows = []
    for each in filter(None, re.split(r"[,\s]+", section.get("rate_limit"))):
        count, _, span = each.partition("/")
        seconds = duration_seconds(span)
        if not count.isdigit() or int(count) < 1 or seconds is None or seconds < 0.01:
            raise ConfigError(f"[{section.name}] rate_limit: write COUNT/DURATION for each window "
                              f"the platform counts in, such as 100/1m, 5/1s")
        windows.append((int(count), seconds))
    return tuple(sorted(windows, key=lambda window: -window[1]))


HANDLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _load_person(section, handle):
    where = f"[{section.name}]"
    if not HANDLE.fullmatch(handle):
        raise ConfigError(f"{where}: a handle is 1 to 64 letters, digits, dots, dashes or "
                          f"underscores")
    mobile = section.get("mobile")
    if mobile and not MOBILE.fullmatch(mobile):
        raise ConfigError(f"{where} mobile: not a phone number: write its digits alone "
                          f"(13800000001), or +COUNTRY-NUMBER (+86-13800000001)")
    ids = {kind: section.get(channel.PERSON_KEY) for kind, channel in CHANNELS.items()
           if section.get(channel.PERSON_KEY)}
    for kind, user_id in ids.items():
        if not USER_ID.fullmatch(user_id):
            raise ConfigError(f"{where} {CHANNELS[kind].PERSON_KEY}: not a user id")
    if not (mobile or ids):
        keys = " or ".join(sorted(person_keys() - PERSON_KEYS))
        raise ConfigError(f"{where}: set mobile or {keys}: a person nobody can @ cannot be paged")
    return Person(handle, section.get("name") or handle, mobile, ids.pop(DEFAULT_KIND, ""),
                  tuple(sorted(ids.items())))


def person_keys():
    """What a [person:HANDLE] may set: a name, a mobile, and an id for each channel's mentions."""
    return PERSON_KEYS | {channel.PERSON_KEY for channel in CHANNELS.values()}


def _load_rotation(section, name, people, tz):
    where = f"[{section.name}]"
    handles = _words(section.get("people"))
    if not handles:
        raise ConfigError(f"{where} people: list at least one person (a rotation with nobody "
                          f"pages nobody)")
    missing = [h for h in handles if h not in people]
    if missing:
        raise ConfigError(f"{where} people: no section [person:{missing[0]}]")
    shift = section.get("shift", Rotation.shift).lower()
    if shift not in SHIFTS:
        raise ConfigError(f"{where} shift: must be one of {', '.join(SHIFTS)}")
    try:
        hand_over_at = dtime.fromisoformat(section.get("hand_over_at", "09:30"))
    except ValueError:
        raise ConfigError(f"{where} hand_over_at: not a time of day such as 09:30")
    if not section.get("start"):
        raise ConfigError(f"{where} start: required, the date of the first shift (2026-12-01)")
    try:
        start = date.fromisoformat(section.get("start"))
    except ValueError:
        raise ConfigError(f"{where} start: not a date (YYYY-MM-DD, such as 2026-12-01)")
    rotation = Rotation(name, tuple(people[h] for h in handles), start, hand_over_at, shift)
    return replace(rotation, overrides=_overrides(section, rotation, people, tz))


def _overrides(section, rotation, people, tz):
    """overrides: one `FROM .. UNTIL = HANDLE` per line. FROM and UNTIL are a date (its
    hand-over time; UNTIL's day included: until the next day's hand-over) or a date and time."""
    found = []
    for number, line in enumerate(section.get("overrides").splitlines(), 1):
        if not line.strip():
            continue
        span, equals, handle = line.partition("=")
        begins, dots, ends = span.partition("..")
        where = f"[{section.name}] overrides: entry {number}"
        if not (equals and dots):
            raise ConfigError(f"{where}: write FROM .. UNTIL = HANDLE")
        if handle.strip() not in people:
            raise ConfigError(f"{where}: no section [person:{handle.strip()}]")
        found.append((_override_time(begins, rotation, tz, where, False),
                      _override_time(ends, rotation, tz, where, True), people[handle.strip()]))
        if found[-1][0] >= found[-1][1]:
            raise ConfigError(f"{where}: ends before it begins")
    return tuple(found)


def _override_time(text, rotation, tz, where, until):
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if until else 0)
            return local_epoch(day, rotation.hand_over_at, tz)
        moment = datetime.fromisoformat(text)
        return local_epoch(moment.date(), moment.time(), tz)
    except ValueError:
        raise ConfigError(f"{where}: {text[:20]!r} is not a date (2026-12-24) or a date and time "
                          f"(2026-12-24 18:00)")


def _load_escalation(section, name, people, rotations):
    """steps: one `AFTER = people, rotation:NAME, receiver:NAME` per line, AFTER a duration
    since the page (600, 10m, 1h30m, 1d), later steps after earlier ones."""
    steps = []
    for number, line in enumerate(section.get("steps").splitlines(), 1):
        if not line.strip():
            continue
        after, equals, targets = line.partition("=")
        where = f"[{section.name}] steps: entry {number}"
        seconds = duration_seconds(after.strip())
        if not equals or seconds is None or seconds <= 0:
            raise ConfigError(f"{where}: write AFTER = people, rotation:NAME, receiver:NAME "
                              f"(AFTER such as 10m)")
        if steps and seconds <= steps[-1].after:
            raise ConfigError(f"{where}: comes no later than the step before it")
        words = _words(targets)
        routes = tuple(dict.fromkeys(w[9:] for w in words if w.startswith("receiver:")))
        named = " ".join(w for w in words if not w.startswith("receiver:"))
        found = _people(_Section.of(section.name, {"steps": named}), "steps", people, rotations)
        if not (routes or found):
            raise ConfigError(f"{where}: names nobody to @ and no receiver")
        steps.append(Step(seconds, found, routes))
    if not steps:
        raise ConfigError(f"[{section.name}] steps: list at least one step")
    return Escalation(name, tuple(steps), section.number("repeat", 0, int, 0, 100))


def _people(section, key, people, rotations):
    """A list of person handles and rotation:NAME words -> Person and Rotation objects."""
    found = []
    for word in _words(section.get(key)):
        if word.startswith("rotation:"):
            if word[9:] not in rotations:
                raise ConfigError(f"[{section.name}] {key}: no section [{word}]")
            found.append(rotations[word[9:]])
        elif word in people:
            found.append(people[word])
        else:
            hint = f" (did you mean rotation:{word}?)" if word in rotations else ""
            raise ConfigError(f"[{section.name}] {key}: no section [person:{word}]{hint}")
    return tuple(found)


def _load_route(section, name, robots, templates, delivery, directory=({}, {}),
                escalations=None):
    names = _words(section.get("robots"))
    if not names:
        raise ConfigError(f"[{section.name}] robots: list at least one robot")
    missing = [n for n in names if n not in robots]
    if missing:
        raise ConfigError(f"[{section.name}] robots: no section [robot:{missing[0]}]")
    mobiles, user_ids = _words(section.get("at_mobiles")), _words(section.get("at_user_ids"))
    if not all(MOBILE.fullmatch(m) for m in mobiles):
        raise ConfigError(f"[{section.name}] at_mobiles: not a list of phone numbers")
    if not all(is_user_id(u) for u in user_ids):
        raise ConfigError(f"[{section.name}] at_user_ids: not a list of DingTalk user ids "
                          f"(or KIND:ID, another kind of robot's)")
    message_type = section.get("message_type", Route.message_type)
    if message_type.lower() not in ("markdown", "actioncard"):
        raise ConfigError(f"[{section.name}] message_type: must be markdown or actionCard")
    priorities = _priorities(section, delivery)
    language = _language(section, templates.language)
    escalation = _route_escalation(section, escalations or {})
    return Route(
        name=name,
        robots=tuple(robots[n] for n in names),
        at_mobiles=mobiles,
        at_user_ids=user_ids,
        at_all=section.bool("at_all", Route.at_all),
        at_severities=_levels(section, "at_severities", "", priorities["priority_order"]),
        at_mobiles_from=_words(section.get("at_mobiles_from")),
        at_user_ids_from=_words(section.get("at_user_ids_from")),
        at_map_label=section.get("at_map_label"),
        at_map=_at_map(section, *directory),
        at_people=_people(section, "at_people", *directory),
        per_alert=section.bool("per_alert", Route.per_alert),
        claim_links=section.bool("claim_links", Route.claim_links),
        app_group=section.get("app_group"),
        escalation=escalation,
        escalate_levels=_levels(section, "escalate_levels", ", ".join(Route.escalate_levels),
                                priorities["priority_order"])
        if escalation else Route.escalate_levels,
        send_resolved=section.bool("send_resolved", Route.send_resolved),
        message_type="actionCard" if message_type.lower() == "actioncard" else "markdown",
        dashboard_url=section.template("dashboard_url", "", DASHBOARD_FIELDS),
        prometheus_url=_base_url(section, "prometheus_url"),
        alertmanager_url=_base_url(section, "alertmanager_url"),
        language=language,
        title=section.template("title", templates.title, TITLE_FIELDS),
        alert=section.template("alert", templates.alert or DEFAULT_ALERTS[language],
                               ALERT_FIELDS),
        compact=section.template("compact", templates.compact, ALERT_FIELDS),
        compact_after=section.number("compact_after", templates.compact_after, int),
        **priorities,
    )


def _route_escalation(section, escalations):
    name = section.get("escalation")
    if name and name not in escalations:
        raise ConfigError(f"[{section.name}] escalation: no section [escalation:{name}]")
    return escalations.get(name)


def _at_map(section, people=None, rotations=None):
    """at_map: one `VALUE = mobiles, user ids, person handles, rotation:NAME` per line, for the
    at_map_label's values."""
    people, rotations, entries = people or {}, rotations or {}, []
    for number, line in enumerate(section.get("at_map").splitlines(), 1):
        if not line.strip():
            continue
        value, equals, ids = line.partition("=")
        if not equals or not value.strip():
            raise ConfigError(f"[{section.name}] at_map: entry {number}: write VALUE = mobiles "
                              f"or user ids")
        words = _words(ids)
        missing = [w for w in words if w.startswith("rotation:") and w[9:] not in rotations]
        if missing:
            raise ConfigError(f"[{section.name}] at_map: entry {number}: no section "
                              f"[{missing[0]}]")
        named = tuple(people[w] if w in people else rotations[w[9:]] for w in words
                      if w in people or w.startswith("rotation:"))
        found = [person(w) for w in words if w not in people and not w.startswith("rotation:")]
        if not words or None in found:
            raise ConfigError(f"[{section.name}] at_map: entry {number}: not a list of phone "
                              f"numbers, DingTalk user ids, people and rotations")
        entries.append((value.strip(), *(tuple(dict.fromkeys(w for k, w in found if k == kind))
                                          for kind in ("mobile", "user_id")), named))
    if entries and not section.get("at_map_label"):
        raise ConfigError(f"[{section.name}] at_map: set at_map_label, the label whose value "
                          f"picks an entry")
    return tuple(entries)


def person(word):
    """An at_map word -> ("mobile", it) for a phone number, ("user_id", id) for `id:X` or any
    other word fit for a DingTalk user id; None for anything else (@all, "all", markup)."""
    if word.startswith("id:") and is_user_id(word[3:]):
        return "user_id", word[3:]
    if MOBILE.fullmatch(word):
        return "mobile", word
    return ("user_id", word) if is_user_id(word) else None


def _base_url(section, key, default="", path=True):
    """An http(s) URL without query (nor path, unless `path`), its trailing slash dropped."""
    url = section.get(key, default).rstrip("/")
    shape = r"https?://[^/\s?#]+" + (r"(/[^\s?#]*)?" if path else "")
    if url and not re.fullmatch(shape, url):
        raise ConfigError(f"[{section.name}] {key}: not an http(s) URL without "
                          f"{'query' if path else 'path'}")
    return url


def _priorities(section, delivery):
    """A route's priority settings: its own keys, else [delivery]'s."""
    order = tuple(w.lower() for w in _words(section.get("priority_order", delivery.priority_order)))
    label = section.get("priority_label", delivery.priority_label)
    if not order or len(set(order)) < len(order) or NO_LEVEL in order:
        raise ConfigError(f"[{section.name}] priority_order: list each level once ({NO_LEVEL} "
                          f"is implied, last)")
    if not label:
        raise ConfigError(f"[{section.name}] priority_label: name a label, such as severity")
    reserve_for = _levels(section, "reserve_for", delivery.reserve_for, order)
    return {"priority_label": label, "priority_order": order, "reserve_for": reserve_for}


def _levels(section, key, default, order):
    """A key that names levels: each one of priority_order, or none. A typo here would mute
    whatever the key turns on (a mention, the reserve) without a word, so it is refused."""
    levels = tuple(w.lower() for w in _words(section.get(key, default)))
    unknown = [w for w in levels if w not in order + (NO_LEVEL,)]
    if unknown:
        raise ConfigError(f"[{section.name}] {key}: {unknown[0]!r} is not a level of "
                          f"priority_order ({', '.join(order + (NO_LEVEL,))})")
    return levels


def robot_named(config, name):
    return next(robot for robot in config.robots if robot.name == name)


def shared_tokens(config):
    """Names of robot sections that share one credential (one robot to its platform), a tuple
    per credential."""
    by_key = {}
    for robot in config.robots:
        by_key.setdefault(robot.key, set()).add(robot.name)
    return [tuple(sorted(names)) for names in by_key.values() if len(names) > 1]


# =============================================================================================
# 4. Intake: the Alertmanager payload, the answer, HTTP
# =============================================================================================

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                      r"(?:[Zz]|([+-])(\d\d):(\d\d))", re.ASCII)


def parse_time(value, where):
    """RFC 3339 -> aware UTC datetime; Go's zero time (year 1) -> None. Parsed by hand, the same
    on every Python: fromisoformat takes 'Z' and nanoseconds only from 3.11. Digits beyond
    microseconds are dropped (not rounded), as Alertmanager's own UI does."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise BadRequest(400, f"{where}: not an RFC 3339 time: {str(value)[:40]!r}")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    if year == "0001":
        return None
    try:
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                         int((fraction or "0")[:6].ljust(6, "0")))
        offset = timedelta(hours=int(off_h or 0), minutes=int(off_m or 0))
        if offset >= timedelta(hours=24) or int(off_m or 0) >= 60:
            raise ValueError("offset out of range")
        utc = (local - offset if sign == "+" else local + offset).replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        raise BadRequest(400, f"{where}: not a valid date: {value[:40]!r}")
    if not 1970 <= utc.year <= 9998:  # what every store can hold (MySQL DATETIME: years 1000-9999)
        raise BadRequest(400, f"{where}: out of range (1970-9998): {value[:40]!r}")
    return utc


def _string_map(value, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(400, f"{where}: must be an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise BadRequest(400, f"{where}.{key[:40]}: must be a string")
    return value


def _string(obj, key, where, required=False):
    value = obj.get(key)
    if value is None and not required:
        return ""
    if required and (not isinstance(value, str) or not value):
        raise BadRequest(400, f"{where}{key}: required, must be a non-empty string")
    if not isinstance(value, str):
        raise BadRequest(400, f"{where}{key}: must be a string")
    return value


def normalize_alert(raw, index, receiver, external_url, now, grafana=False):
    """One payload alert -> the dict the journal stores, the renderer and the recorder read;
    `grafana`: the payload is Grafana's, whose alerts carry their own links and values."""
    where = f"alerts[{index}]."
    if not isinstance(raw, dict):
        raise BadRequest(400, f"alerts[{index}]: must be an object")
    status = raw.get("status")
    if status not in ("firing", "resolved"):
        raise BadRequest(400, f"{where}status: must be 'firing' or 'resolved'")
    labels = _string_map(raw.get("labels"), where + "labels")
    if not labels:
        raise BadRequest(400, f"{where}labels: required, must be a non-empty object")
    annotations = _string_map(raw.get("annotations"), where + "annotations")
    if "startsAt" not in raw:
        raise BadRequest(400, f"{where}startsAt: required")
    starts_at = parse_time(raw["startsAt"], where + "startsAt") or now
    ends_at = parse_time(raw["endsAt"], where + "endsAt") if raw.get("endsAt") is not None else None
    if status == "resolved":
        ends_at = ends_at or now
    else:
        ends_at = None  # a firing alert's endsAt is only Alertmanager's estimate
    fingerprint = _string(raw, "fingerprint", where)
    if not fingerprint:  # Alertmanager before 0.19 sent none: derive it from the labels
        fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    alert = {
        "fingerprint": fingerprint[:64],
        "status": status,
        "starts_at": db_time(starts_at),
        "ends_at": db_time(ends_at),
        "labels": labels,
        "annotations": annotations,
        "generator_url": _string(raw, "generatorURL", where),
        "external_url": external_url,
        "receiver": receiver,
    }
    if grafana:
        alert["grafana"] = grafana_fields(raw, where)
    return alert


# Grafana's webhook contact point sends Alertmanager's payload with "version": "1", "orgId"
# and "state" at the top, and per alert its own links and the values of the rule's queries.
GRAFANA_VERSION = "1"
GRAFANA_LINKS = (("silence_url", "silenceURL"), ("dashboard_url", "dashboardURL"),
                 ("panel_url", "panelURL"), ("image_url", "imageURL"))
MAX_VALUES = 20         # a Grafana alert's values shown; the rest counted
VALUES_CHARS = 500      # the text of a Grafana alert's values, at most
LINK_CHARS = 2048       # a longer Grafana link is left out: cut, a silence would lose matchers


def is_grafana(payload):
    """Whether a payload is Grafana's webhook (its version, orgId and state), not Alertmanager's."""
    return (payload.get("version") == GRAFANA_VERSION and "orgId" in payload
            and "state" in payload)


def grafana_fields(raw, where):
    """What a Grafana alert adds: its silence, dashboard, panel and image links, and its values
    as text ("B=44.2394, C=1"), else its valueString, bounded before any work on them."""
    fields = {key: _string(raw, name, where) for key, name in GRAFANA_LINKS}
    fields = {key: link if len(link) <= LINK_CHARS else "" for key, link in fields.items()}
    value_string = _string(raw, "valueString", where)
    values = raw.get("values")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise BadRequest(400, f"{where}values: must be an object of numbers")
    shown = []
    for index, (key, value) in enumerate(values.items()):
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(value)
            if index < MAX_VALUES:
                shown.append(f"{key[:40]}={float(value):.6g}")
        except (TypeError, OverflowError):
            raise BadRequest(400, f"{where}values.{key[:40]}: must be a number (a float64)")
    more = len(values) - MAX_VALUES
    text = ", ".join(shown) + (f" (+{more})" if more > 0 else "")
    text = text or value_string
    fields["values"] = text if len(text) <= VALUES_CHARS else text[:VALUES_CHARS - 1] + "…"
    return fields


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_webhook(body, path_receiver=None, now=None):
    """Bytes of an Alertmanager v4 webhook, or of Grafana's (is_grafana) -> Webhook. Raises
    BadRequest saying what is wrong."""
    now = now or datetime.now(timezone.utc)
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(400, "body is not valid UTF-8")
    except RecursionError:
        raise BadRequest(400, "body is nested too deeply")
    except ValueError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        raise BadRequest(400, "body must be a JSON object (an Alertmanager webhook)")
    try:
        if _SURROGATE_ESCAPE.search(body):  # only then can a string hold a lone surrogate
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(400, "body has an invalid \\u escape (a lone UTF-16 surrogate)")
    grafana = is_grafana(payload)
    if payload.get("version") == GRAFANA_VERSION and not grafana:
        raise BadRequest(400, "version: \"1\" is Grafana's webhook, which has orgId and state")
    if payload.get("version") != "4" and not grafana:
        raise BadRequest(400, f"version: expected \"4\", got {str(payload.get('version'))[:20]!r}")
    if grafana and (not isinstance(payload["orgId"], int) or isinstance(payload["orgId"], bool)):
        raise BadRequest(400, "orgId: must be an integer")
    if grafana and not isinstance(payload["state"], str):
        raise BadRequest(400, "state: must be a string")
    if payload.get("status") not in ("firing", "resolved"):
        raise BadRequest(400, "status: must be 'firing' or 'resolved'")
    # Surrounding spaces are dropped: MySQL compares strings ignoring trailing spaces, and both
    # history stores must keep receivers apart (or together) alike.
    receiver = (path_receiver or _string(payload, "receiver", "", required=True)).strip()
    if not receiver:
        raise BadRequest(400, "receiver: required, must be a non-empty string")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise BadRequest(400, "alerts: required, must be a list")
    group_labels = _string_map(payload.get("groupLabels"), "groupLabels")
    for key in ("commonLabels", "commonAnnotations"):
        _string_map(payload.get(key), key)
    external_url = _string(payload, "externalURL", "")
    truncated = payload.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise BadRequest(400, "truncatedAlerts: must be a non-negative integer")
    return Webhook(
        receiver=receiver[:128],
        external_url=external_url,
        group_key=_string(payload, "groupKey", ""),
        alerts=[normalize_alert(a, i, receiver[:128], external_url, now, grafana)
                for i, a in enumerate(alerts)],
        truncated=truncated,
        group_labels=group_labels,
    )


FIRING_ENDS_AT = "0001-01-01T00:00:00Z"    # a firing alert's endsAt in a webhook


def webhook_of_api_alerts(body, receiver=None, now=None):
    """The preview and --render take what people have at hand: an array of alerts as
    Alertmanager's GET /api/v2/alerts (and `amtool alert query -o json`) gives them, made into
    the webhook Alertmanager would send for them as one group (the receiver: `receiver`, else
    the first alert's first); the bytes of a webhook; anything else comes back as it is, for
    parse_webhook to judge."""
    try:
        alerts = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(alerts, list):
        return body
    if not all(isinstance(a, dict) for a in alerts):
        raise BadRequest(400, "an array must hold Alertmanager's alerts (GET /api/v2/alerts)")
    now = now or datetime.now(timezone.utc)
    named = [r.get("name") for a in alerts for r in a.get("receivers") or ()
             if isinstance(r, dict) and isinstance(r.get("name"), str)]
    receiver = receiver or (named[0] if named else "")
    if not receiver:
        raise BadRequest(400, "receiver: these alerts name none, choose one")
    converted = []
    for index, alert in enumerate(alerts):
        ends = alert.get("endsAt")
        ended = parse_time(ends, f"[{index}].endsAt") if isinstance(ends, str) else None
        over = ended is not None and ended < now
        converted.append({
            "status": "resolved" if over else "firing", "labels": alert.get("labels") or {},
            "annotations": alert.get("annotations") or {}, "startsAt": alert.get("startsAt"),
            "endsAt": ends if over else FIRING_ENDS_AT,
            "generatorURL": alert.get("generatorURL") or "",
            "fingerprint": alert.get("fingerprint") or ""})
    status = "firing" if any(a["status"] == "firing" for a in converted) else "resolved"
    return json.dumps({"version": "4", "status": status, "receiver": receiver,
                       "groupLabels": {}, "alerts": converted}).encode()


class _DeadlineReader(io.RawIOBase):
    """The socket as a file whose reads fail once the handler's deadline has passed."""

    def __init__(self, sock, handler):
        super().__init__()
        self.sock = sock
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("request_timeout exceeded")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class Intake:
    """The policy for a valid webhook: which route serves it, into the journal, and the answer
    (HTTP status, JSON reply). The HTTP side is IntakeHandler's. `last_webhooks`: route name
    -> (time, the last webhook it took, as text), for the preview (one dict assignment a
    webhook: atomic, no lock)."""

    def __init__(self, config, journal, metrics, last_webhooks, clock):
        self.config, self.journal, self.metrics = config, journal, metrics
        self.last_webhooks, self.clock = last_webhooks, clock

    def accept(self, webhook, request_id, payload=b""):
        route = self.config().route_for(webhook.receiver)
        if route is None:
            raise BadRequest(404, f"unknown receiver {webhook.receiver[:60]!r} and no "
                                  f"default_receiver configured")
        try:
            self.journal.add_webhook(webhook, route, request_id)
        except sqlite3.Error as exc:
            log.error("request_id=%s journal write failed (%s): answering 503 so Alertmanager "
                      "retries", request_id, exc)
            return 503, {"error": "journal not writable, retry later", "request_id": request_id}
        self.metrics.inc("alertbridge_alerts_accepted_total", len(webhook.alerts))
        self.last_webhooks[route.name] = (self.clock(), payload.decode("utf-8", "replace"))
        log.info("request_id=%s accepted receiver=%s route=%s alerts=%d group=%s", request_id,
                 logfmt(webhook.receiver), route.name, len(webhook.alerts),
                 logfmt(webhook.group_key[:120]))
        return 200, {"status": "accepted", "alerts": len(webhook.alerts), "request_id": request_id}


class Requests:
    """The HTTP requests being handled: counted (shutdown waits for them, /metrics shows them),
    and told to go away once `draining`. _done guards count."""

    def __init__(self):
        self.count = 0
        self.draining = False
        self._done = threading.Condition()

    @contextlib.contextmanager
    def handling(self):
        with self._done:
            self.count += 1
        try:
            yield
        finally:
            with self._done:
                self.count -= 1
                self._done.notify_all()

    def drain(self, timeout):
        """Refuse new requests; wait up to `timeout` seconds for those under way."""
        self.draining = True
        with self._done:
            self._done.wait_for(lambda: self.count == 0, timeout)


@dataclass(frozen=True)
class Endpoints:
    """What the HTTP handler serves, given by the Bridge that wires them."""
    config: object          # () -> the running Config
    intake: Intake
    status_page: object     # StatusPage: / and /api/on-call
    incidents: object       # IncidentPages: /incident/TOKEN
    preview: object         # Preview: /preview
    probes: object          # Probes: /-/ready, /metrics
    metrics: object         # Metrics
    requests: Requests
    reload: object          # () -> (ok, message, [keys only a restart applies])
    send_test: object       # route name, its fingerprint -> (HTTP status, reply)


class IntakeServer(http.server.ThreadingHTTPServer):
    """Thread per connection, at most `max_connections` at once: beyond that a connection is
    answered 503 and closed at once, so a flood of idle clients cannot exhaust the bridge."""
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                body = b'{"error": "too many connections, retry later"}\n'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                                b"Content-Type: application/json\r\nConnection: close\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def listen_problem(service, exc):
    """Why the HTTP server cannot listen, in one line an operator can act on."""
    where = f"cannot listen on {service.listen}:{service.port}"
    hints = {errno.EADDRINUSE: "address already in use (another alertbridge, or another program: "
                               f"ss -ltnp 'sport = :{service.port}')",
             errno.EACCES: "permission denied (a port below 1024 needs root or "
                           "CAP_NET_BIND_SERVICE)",
             errno.EADDRNOTAVAIL: "not an address of this host ([alertbridge] listen)"}
    if isinstance(exc, socket.gaierror):
        return f"{where}: [alertbridge] listen is not an address or a known host name"
    return f"{where}: {hints.get(exc.errno, exc.strerror or str(exc))}"


def try_listen(service):
    """Bind the configured address and port for a moment; None, or listen_problem(). A port in
    use may be the running daemon's own: that is for the caller to judge (EADDRINUSE)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((service.listen, service.port))
    except OSError as exc:
        return exc
    return None


class IntakeHandler(http.server.BaseHTTPRequestHandler):
    """HTTP front door: framing, authentication and endpoints; a webhook goes to Intake.
    `endpoints` (Endpoints) is set on a per-bridge subclass (see Bridge.start). Every answer but
    those of the health, metrics and reload endpoints counts in alertbridge_webhooks_total by
    status."""
    endpoints = None
    protocol_version = "HTTP/1.1"
    server_version = "alertbridge/" + VERSION
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't wait for an ACK
    PROBES = ("/-/healthy", "/-/ready", "/metrics")
    # /alertmanager[/RECEIVER]; and prometheus-webhook-dingtalk's /dingtalk/TARGET/send, so
    # that switching from it changes host and port only (a 404 is not retried: pages lost)
    WEBHOOK_PATHS = re.compile(r"/(?:alertmanager(?:/(?P<receiver>[^/]+))?"
                               r"|dingtalk/(?P<target>[^/]+)/send)?/?")

    def setup(self):
        self.service = self.endpoints.config().service
        self.timeout = self.service.request_timeout
        super().setup()
        self.deadline = time.monotonic() + self.timeout
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def parse_request(self):
        if not str(self.raw_requestline, "iso-8859-1").split():  # as http.server splits it
            self.command, self.requestline = None, ""
            self.send_error(400, "empty request line")
            return False
        return super().parse_request()

    def handle_one_request(self):
        # Each request (and each wait for the next one on a kept-alive connection) gets
        # request_timeout in all: a client sending a byte a second cannot hold a thread forever.
        self.deadline = time.monotonic() + self.timeout
        self.body_left = 0      # bytes of the current request's body not yet read
        try:
            super().handle_one_request()
        except ConnectionError:  # the client went away between requests: nothing to answer
            self.close_connection = True

    def log_message(self, fmt, *args):
        log.debug("http %s %s", self.address_string(), fmt % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own rejections (bad request line, headers too long, unknown method) in
        the same one-line JSON as ours. An unknown method is a 405 and an unknown HTTP version a
        400: bad input is never answered 5xx."""
        code = {501: 405, 505: 400}.get(code, code)
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # never answer in HTTP/0.9 (no status line)
        self._reply(code, {"error": message or http.HTTPStatus(code).phrase})

    def do_POST(self):
        self._guarded(self._post)

    def do_GET(self):
        self._guarded(self._get)

    def do_PUT(self):
        self._guarded(self._method_not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def _guarded(self, handler):
        request_id = uuid.uuid4().hex[:12]
        with self.endpoints.requests.handling():
            try:
                self.body_left = self._framing()
                if self.endpoints.requests.draining:
                    self.close_connection = True
                    raise BadRequest(503, "shutting down, retry later")
                handler(request_id)
            except BadRequest as exc:
                log.info("request_id=%s rejected status=%d reason=%s", request_id, exc.status,
                         logfmt(exc.reason))
                self._reply(exc.status, {"error": exc.reason, "request_id": request_id},
                            headers=exc.headers)
            except (ConnectionError, socket.timeout):
                self.close_connection = True
            except Exception:
                log.exception("request_id=%s internal error", request_id)
                self._reply(500, {"error": "internal error, see the daemon's log",
                                  "request_id": request_id})

    def _authorize(self, page=False):
        """Webhooks, pages and reload need [auth]'s credentials when it is set. A browser asks
        for a username and password only when challenged with Basic: pages prefer it."""
        auth = self.endpoints.config().auth
        if auth.enabled and not auth.allows(self.headers.get("Authorization")):
            scheme = "Basic" if auth.username and (page or not auth.bearer_token) else "Bearer"
            raise BadRequest(401, "missing or wrong credentials (see [auth] in config.ini)",
                             headers=[("WWW-Authenticate", f'{scheme} realm="alertbridge"')])

    def _reply(self, status, obj, content_type="application/json", headers=(), count=True):
        body = obj if isinstance(obj, bytes) else json_line(obj)
        if count:
            self.endpoints.metrics.inc("alertbridge_webhooks_total", outcome=str(status))
        try:
            self._settle_body()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    def _route(self):
        return urllib.parse.urlsplit(self.path).path

    def _get(self, request_id):
        path = self._route()
        endpoints = self.endpoints
        if path in self.PROBES and endpoints.config().auth.protect_metrics:
            self._authorize()
        if path == "/-/healthy":
            return self._reply(200, b"OK\n", "text/plain", count=False)
        if path == "/-/ready":
            ready, detail = endpoints.probes.readiness()
            return self._reply(200 if ready else 503, detail, count=False)
        if path == "/metrics":
            return self._reply(200, endpoints.probes.render_metrics().encode(),
                               "text/plain; version=0.0.4", count=False)
        if path in ("/", "/status"):
            self._authorize(page=True)
            return self._page(200, endpoints.status_page.status())
        if path.startswith("/incident/"):     # behind its signature only: phones open it
            return self._page(*endpoints.incidents.incident(path[10:], self._cookies()))
        if path == "/api/oncall":
            self._authorize()
            return self._reply(200, endpoints.status_page.on_call(), count=False)
        if path == "/preview":
            self._authorize(page=True)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query,
                                          keep_blank_values=True)
            return self._page(*endpoints.preview.preview(last=query.get("last", [None])[0],
                                                       sample="sample" in query))
        self._method_not_allowed(request_id)

    def _page(self, status, text, headers=()):
        self._reply(status, text.encode(), "text/html; charset=utf-8",
                    PAGE_HEADERS + tuple(headers), count=False)

    def _cookies(self):
        jar = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            jar.load(self.headers.get("Cookie", ""))
        return {name: morsel.value for name, morsel in jar.items()}

    def _method_not_allowed(self, request_id):
        path = self._route()
        if self.WEBHOOK_PATHS.fullmatch(path) or path in ("/-/reload", "/-/send-test", "/preview"):
            raise BadRequest(405, f"{self.command} not allowed on {path}: use POST")
        raise BadRequest(404, f"no such endpoint: {path[:100]}")

    def _post(self, request_id):
        path = self._route()
        if path == "/-/reload":
            self._authorize()
            self._read_body()
            ok, message, restart_needed = self.endpoints.reload()
            reply = {"status": "reloaded"} if ok else {"error": message}
            if ok and restart_needed:
                reply["restart_needed"] = restart_needed
            return self._reply(200 if ok else 500, reply, count=False)
        if path == "/preview":
            self._authorize(page=True)
            return self._page(*self.endpoints.preview.preview(form=self._form()))
        if path.startswith("/incident/"):
            return self._page(*self.endpoints.incidents.incident(path[10:], self._cookies(),
                                                             self._form()))
        if path == "/-/send-test":
            self._authorize()
            self._read_body()
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            status, reply = self.endpoints.send_test(query.get("receiver", [""])[0],
                                                     query.get("route", [""])[0])
            return self._reply(status, reply, count=False)
        match = self.WEBHOOK_PATHS.fullmatch(path)
        if not match:
            raise BadRequest(404, f"no such endpoint: {path[:100]}; post webhooks to /alertmanager")
        self._authorize()
        if "Content-Length" not in self.headers:
            self.close_connection = True  # a body may follow that we cannot delimit
            raise BadRequest(411, "Content-Length required")
        content_type = self.headers.get("Content-Type", "application/json")
        content_type = content_type.split(";")[0].strip().lower()
        if content_type not in ("application/json", "text/json", ""):
            raise BadRequest(415, f"Content-Type must be application/json, "
                                  f"not {content_type[:60]!r}")
        body = self._read_body()
        named = match.group("receiver") or match.group("target")
        path_receiver = urllib.parse.unquote(named) if named else None
        webhook = parse_webhook(body, path_receiver)
        status, reply = self.endpoints.intake.accept(webhook, request_id, body)
        self._reply(status, reply)

    def _form(self):
        """A submitted HTML form's fields (the first value of each). The preview takes what a
        webhook may be, form-encoded: up to three times max_body_bytes."""
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise BadRequest(415, "Content-Type must be application/x-www-form-urlencoded "
                                  "(the preview's form)")
        body = self._read_body(3 * self.service.max_body_bytes)
        try:
            fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True,
                                           max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "the form is not valid UTF-8 or has too many fields")
        return {k: v[0] for k, v in fields.items()}

    def _framing(self):
        """Bytes of body that follow the headers. Framing we cannot be sure of is refused and
        the connection closed after the answer: a body we cannot delimit must never be read as
        the next request (a proxy in front may have framed it differently)."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            if lengths:
                raise BadRequest(400, "both Transfer-Encoding and Content-Length: "
                                      "ambiguous framing")
            raise BadRequest(411, "chunked bodies are not accepted: send Content-Length")
        if len(lengths) > 1:
            self.close_connection = True
            raise BadRequest(400, "Content-Length repeated: ambiguous framing")
        if not lengths:
            return 0    # RFC 9112 6.3: a request with neither header has no body
        if not re.fullmatch(r"[0-9]{1,18}", lengths[0].strip()):
            self.close_connection = True
            raise BadRequest(400, "Content-Length is not a number")
        return int(lengths[0])

    def _read_body(self, limit=None):
        length, limit = self.body_left, limit or self.service.max_body_bytes
        if length > limit:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise BadRequest(413, f"body of {length} bytes exceeds the limit of {limit} bytes "
                                  f"(max_body_bytes)")
        self.body_left = 0
        chunks, remaining = [], length
        while remaining:
            try:
                chunk = self.rfile.read1(min(remaining, 65536))
            except socket.timeout:
                self.close_connection = True
                raise BadRequest(408, f"body not received within request_timeout "
                                      f"({self.service.request_timeout:g}s)")
            if not chunk:
                self.close_connection = True
                raise BadRequest(400, f"body ended after {length - remaining} of {length} bytes")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _settle_body(self):
        """Before any answer: drain a small unread body so keep-alive stays in step; for a
        larger one, close the connection instead of reading it."""
        if self.body_left > 65536:
            self.close_connection = True
        elif self.body_left:
            try:
                self._read_body()
            except (BadRequest, OSError):
                self.close_connection = True
        self.body_left = 0


# =============================================================================================
# 5. Storage: all SQL, the Journal, the Store
# =============================================================================================
# Every statement is written with %s placeholders (pymysql's paramstyle); Dialect.sql() turns
# them into ? for sqlite3. Values are always passed as parameters, never formatted into text.

MIN_SQLITE = (3, 26, 0)   # upserts (3.24), RENAME COLUMN (3.25); RHEL 8 ships 3.26, Debian 11 3.34

# The journal: J_* statements. Tables first; then migrations of journals made by older versions;
# then the indexes, which name the migrated columns.
JOURNAL_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    recorded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body TEXT NOT NULL,
    packed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    done_at REAL,
    priority INTEGER NOT NULL DEFAULT 99,
    level TEXT NOT NULL DEFAULT 'none',
    alert_keys TEXT NOT NULL DEFAULT '',
    claims TEXT NOT NULL DEFAULT '',
    reserve INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    robot TEXT NOT NULL,
    at REAL NOT NULL,
    errcode INTEGER,
    robot_key TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS cards (
    track TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    group_hash TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL
);
CREATE INDEX IF NOT EXISTS ix_cards_open ON cards (route, group_hash, closed_at);
CREATE TABLE IF NOT EXISTS relayed (note_key TEXT PRIMARY KEY, at REAL NOT NULL);
"""
JOURNAL_MIGRATIONS = (  # (table, column it must have, statement that adds it), for older journals
    ("messages", "route", "ALTER TABLE messages RENAME COLUMN receiver TO route"),
    ("messages", "priority",
     "ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 99"),
    ("messages", "level", "ALTER TABLE messages ADD COLUMN level TEXT NOT NULL DEFAULT 'none'"),
    ("messages", "alert_keys",
     "ALTER TABLE messages ADD COLUMN alert_keys TEXT NOT NULL DEFAULT ''"),
    ("messages", "claims", "ALTER TABLE messages ADD COLUMN claims TEXT NOT NULL DEFAULT ''"),
    ("sends", "robot_key", "ALTER TABLE sends ADD COLUMN robot_key TEXT NOT NULL DEFAULT ''"),
    ("messages", "reserve", "ALTER TABLE messages ADD COLUMN reserve INTEGER NOT NULL DEFAULT 1"),
)
JOURNAL_INDEXES = """
CREATE INDEX IF NOT EXISTS events_unrecorded ON events (recorded, id);
DROP INDEX IF EXISTS messages_pending;
CREATE INDEX IF NOT EXISTS messages_by_priority ON messages (state, route, priority, id);
DROP INDEX IF EXISTS messages_due;
DROP INDEX IF EXISTS messages_receiver_due;
CREATE INDEX IF NOT EXISTS messages_route_due ON messages (state, route, next_attempt_at);
CREATE INDEX IF NOT EXISTS messages_age ON messages (state, created_at);
CREATE INDEX IF NOT EXISTS sends_at ON sends (at);
"""

J_META_GET = "SELECT value FROM meta WHERE key = %s"
J_META_PUT = "INSERT OR IGNORE INTO meta (key, value) VALUES (%s, %s)"
J_EVENT_ADD = "INSERT INTO events (kind, body, created_at) VALUES (%s, %s, %s)"
J_EVENTS_UNRECORDED = "SELECT id, kind, body FROM events WHERE recorded = 0 ORDER BY id LIMIT %s"
J_EVENTS_MARK = "UPDATE events SET recorded = %s WHERE id = %s"
J_EVENTS_MARK_UPTO = "UPDATE events SET recorded = 1 WHERE recorded = 0 AND id <= %s"
J_EVENTS_BACKLOG = "SELECT COUNT(*), MIN(created_at) FROM events WHERE recorded = 0"
J_COLUMNS = "SELECT name FROM pragma_table_info(%s)"
J_MESSAGE_ADD = ("INSERT INTO messages (route, request_id, body, packed, created_at, "
                 "next_attempt_at, priority, level, alert_keys, claims, reserve) "
                 "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
# Routes with pending messages, one index probe each (a DISTINCT would read every pending row).
J_MESSAGE_ROUTES = ("WITH RECURSIVE r (name) AS ("
                    "SELECT MIN(route) FROM messages WHERE state = 'pending' UNION ALL "
                    "SELECT (SELECT MIN(route) FROM messages "
                    "WHERE state = 'pending' AND route > name) "
                    "FROM r WHERE name IS NOT NULL) "
                    "SELECT name FROM r WHERE name IS NOT NULL")
J_MESSAGES_DUE = ("SELECT id, request_id, packed, attempts, created_at, priority, level, claims, "
                  "reserve FROM messages WHERE state = 'pending' AND route = %s "
                  "AND next_attempt_at <= %s ORDER BY priority, id LIMIT %s")
# The alerts of a route's pending messages, as keys: the newest copy of an alert is the one sent.
J_MESSAGE_KEYS = ("SELECT id, alert_keys FROM messages "
                  "WHERE state = 'pending' AND route = %s AND id > %s ORDER BY id")
J_MESSAGE_BODY = "SELECT body FROM messages WHERE id = %s"
J_CARD_OPEN = ("SELECT track FROM cards WHERE route = %s AND group_hash = %s AND closed_at IS NULL "
               "ORDER BY opened_at DESC LIMIT 1")
J_CARD_ADD = "INSERT INTO cards (track, route, group_hash, opened_at) VALUES (%s, %s, %s, %s)"
J_CARD_CLOSE = "UPDATE cards SET closed_at = %s WHERE track = %s"
J_MESSAGE_NEXT_DUE = ("SELECT MIN(next_attempt_at) FROM messages "
                      "WHERE state = 'pending' AND route = %s")
J_MESSAGES_WAITING = "SELECT COUNT(*) FROM messages WHERE state = 'pending' AND route = %s"
J_MESSAGE_FINISH = "UPDATE messages SET state = %s, done_at = %s, last_error = %s WHERE id = %s"
J_MESSAGE_RETRY = ("UPDATE messages SET attempts = attempts + 1, next_attempt_at = %s, "
                   "last_error = %s WHERE id = %s")
J_MESSAGES_EXPIRE = ("SELECT id, route, request_id FROM messages "
                     "WHERE state = 'pending' AND created_at < %s")
J_MESSAGES_BACKLOG = "SELECT COUNT(*), MIN(created_at) FROM messages WHERE state = 'pending'"
# A message's send keys (see send_key) are in its column `claims`, and the cluster's in
# cluster_claims: names from before "claim" meant only a person taking an incident.
J_MESSAGES_SEND_KEYS = ("SELECT id, claims FROM messages WHERE state = 'pending' "
                     "ORDER BY created_at LIMIT %s")
J_SEND_KEYS_SINCE = "SELECT id, claims FROM messages WHERE id > %s ORDER BY id LIMIT %s"
J_MESSAGES_UNSEEN = ("SELECT id, route, request_id, body, packed, priority, level, claims, "
                     "created_at FROM messages WHERE state = 'pending' AND id > %s "
                     "AND created_at < %s ORDER BY id LIMIT %s")
J_SEND_KEY_HELD = ("SELECT 1 FROM messages WHERE state <> 'handed off' "
                "AND instr(' ' || claims || ' ', ' ' || %s || ' ') > 0 LIMIT 1")
J_SEND_KEYS_ADD = "UPDATE messages SET claims = trim(claims || ' ' || %s) WHERE id = %s"
J_RELAYED = "SELECT 1 FROM relayed WHERE note_key = %s"
J_RELAYED_ADD = "INSERT OR IGNORE INTO relayed (note_key, at) VALUES (%s, %s)"
J_MESSAGE_STATE = "SELECT state FROM messages WHERE id = %s"
J_MESSAGES_BY_LEVEL = ("SELECT level, COUNT(*), MIN(created_at) FROM messages "
                       "WHERE state = 'pending' GROUP BY level")
J_MESSAGES_STATES = "SELECT state, COUNT(*) FROM messages GROUP BY state"
J_QUEUE_BY_ROUTE = ("SELECT route, level, COUNT(*), MIN(created_at) FROM messages "
                    "WHERE state = 'pending' GROUP BY route, level")
J_EXPIRED_BY_ROUTE = "SELECT route, COUNT(*) FROM messages WHERE state = 'expired' GROUP BY route"
J_SEND_BEGIN = "INSERT INTO sends (robot, robot_key, at) VALUES (%s, %s, %s)"
J_SEND_END = "UPDATE sends SET at = %s, errcode = %s WHERE id = %s"
J_SEND_ADD = "INSERT INTO sends (robot, robot_key, at, errcode) VALUES (%s, %s, %s, %s)"
J_SENDS_SINCE = "SELECT robot, robot_key, at, errcode FROM sends WHERE at > %s ORDER BY at"
# Times an earlier run wrote in the future of this one's clock (the wall clock stepped back
# between them): brought to now, so that nothing waits for the length of the step.
J_FORWARD_DUE = ("UPDATE messages SET next_attempt_at = %s "
                 "WHERE state = 'pending' AND next_attempt_at > %s")
J_FORWARD_CREATED = ("UPDATE messages SET created_at = %s "
                     "WHERE state = 'pending' AND created_at > %s")
J_FORWARD_SENDS = "UPDATE sends SET at = %s WHERE at > %s"
J_PROBE = "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', %s)"
J_PURGE_EVENTS = "DELETE FROM events WHERE recorded = 1 AND created_at < %s"
J_PURGE_MESSAGES = ("DELETE FROM messages "
                    "WHERE state IN ('sent', 'merged', 'split', 'duplicate', 'handed off') "
                    "AND done_at < %s")
J_PURGE_SENDS = "DELETE FROM sends WHERE at < %s"
J_PURGE_RELAYED = "DELETE FROM relayed WHERE at < %s"

# The history: S_* statements. Its schema, as schema.sql ships it (MySQL 5.7+/8, MariaDB 10.x).
MYSQL_SCHEMA = """\
CREATE TABLE IF NOT EXISTS alerts (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  receiver VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  fingerprint VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  starts_at DATETIME(3) NOT NULL,
  ends_at DATETIME(3) NULL,
  status VARCHAR(16) NOT NULL,
  alertname VARCHAR(255) NOT NULL DEFAULT '',
  instance VARCHAR(255) NOT NULL DEFAULT '',
  severity VARCHAR(64) NOT NULL DEFAULT '',
  job VARCHAR(255) NOT NULL DEFAULT '',
  summary TEXT NULL,
  description TEXT NULL,
  labels JSON NOT NULL,
  annotations JSON NOT NULL,
  generator_url TEXT NULL,
  first_received_at DATETIME(3) NOT NULL,
  last_received_at DATETIME(3) NOT NULL,
  received_count INT UNSIGNED NOT NULL DEFAULT 1,
  notified_count INT UNSIGNED NOT NULL DEFAULT 0,
  robots VARCHAR(1024) NOT NULL DEFAULT '',
  PRIMARY KEY (id),
  UNIQUE KEY uq_alerts_occurrence (receiver, fingerprint, starts_at),
  KEY ix_alerts_starts_at (starts_at),
  KEY ix_alerts_status (status, starts_at),
  KEY ix_alerts_alertname (alertname, starts_at),
  KEY ix_alerts_severity (severity)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS notifications (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  sent_at DATETIME(3) NOT NULL,
  receiver VARCHAR(128) NOT NULL,
  robot VARCHAR(128) NOT NULL,
  request_id VARCHAR(255) NOT NULL DEFAULT '',
  message_id BIGINT NOT NULL,
  alerts INT UNSIGNED NOT NULL,
  fingerprints TEXT NULL,
  errcode INT NULL,
  errmsg VARCHAR(512) NOT NULL DEFAULT '',
  latency_ms INT UNSIGNED NOT NULL,
  PRIMARY KEY (id),
  KEY ix_notifications_sent_at (sent_at),
  KEY ix_notifications_receiver (receiver, robot, sent_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS recorder_progress (
  journal_id VARCHAR(64) NOT NULL,
  last_event_id BIGINT NOT NULL,
  PRIMARY KEY (journal_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS incidents (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  route VARCHAR(128) NOT NULL,
  receiver VARCHAR(128) NOT NULL,
  group_hash CHAR(64) NOT NULL,
  open_group CHAR(64) NULL,
  group_key TEXT NOT NULL,
  group_labels JSON NOT NULL,
  title VARCHAR(512) NOT NULL DEFAULT '',
  level VARCHAR(64) NOT NULL DEFAULT '',
  level_rank INT NULL,
  state VARCHAR(16) NOT NULL,
  opened_at DATETIME(3) NOT NULL,
  acknowledged_at DATETIME(3) NULL,
  acknowledged_by VARCHAR(128) NULL,
  resolved_at DATETIME(3) NULL,
  escalations INT UNSIGNED NOT NULL DEFAULT 0,
  next_step_at DATETIME(3) NOT NULL,
  silence_id VARCHAR(64) NULL,
  silenced_until DATETIME(3) NULL,
  steps_from DATETIME(3) NULL,
  alerts_started_at DATETIME(3) NULL,
  alerts_ended_at DATETIME(3) NULL,
  source VARCHAR(16) NOT NULL DEFAULT 'alertmanager',
  PRIMARY KEY (id),
  UNIQUE KEY uq_incidents_open (route, open_group),
  KEY ix_incidents_next_step (state, next_step_at),
  KEY ix_incidents_group (route, group_hash, resolved_at),
  KEY ix_incidents_state (state, opened_at),
  KEY ix_incidents_opened_at (opened_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS incident_events (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  incident_id BIGINT UNSIGNED NOT NULL,
  at DATETIME(3) NOT NULL,
  kind VARCHAR(32) NOT NULL,
  actor VARCHAR(128) NOT NULL DEFAULT '',
  via VARCHAR(32) NOT NULL DEFAULT '',
  detail VARCHAR(1024) NOT NULL DEFAULT '',
  PRIMARY KEY (id),
  KEY ix_incident_events_incident (incident_id, at),
  KEY ix_incident_events_at (at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS incident_notes (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  note_key CHAR(64) CHARACTER SET ascii NOT NULL,
  incident_id BIGINT UNSIGNED NOT NULL,
  route VARCHAR(128) NOT NULL,
  kind VARCHAR(16) NOT NULL,
  level VARCHAR(64) NOT NULL DEFAULT '',
  text TEXT NOT NULL,
  mentions TEXT NOT NULL,
  created_at DATETIME(3) NOT NULL,
  relayed_by VARCHAR(64) NULL,
  sent_at DATETIME(3) NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uq_incident_notes_key (note_key),
  KEY ix_incident_notes_unsent (sent_at, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"""

# The same tables in SQLite's words: the one explicit dialect difference in the schema.
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  receiver TEXT NOT NULL, fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, ends_at TEXT,
  status TEXT NOT NULL, alertname TEXT NOT NULL DEFAULT '', instance TEXT NOT NULL DEFAULT '',
  severity TEXT NOT NULL DEFAULT '', job TEXT NOT NULL DEFAULT '', summary TEXT, description TEXT,
  labels TEXT NOT NULL, annotations TEXT NOT NULL, generator_url TEXT,
  first_received_at TEXT NOT NULL, last_received_at TEXT NOT NULL,
  received_count INTEGER NOT NULL DEFAULT 1, notified_count INTEGER NOT NULL DEFAULT 0,
  robots TEXT NOT NULL DEFAULT '',
  UNIQUE (receiver, fingerprint, starts_at)
);
CREATE INDEX IF NOT EXISTS ix_alerts_starts_at ON alerts (starts_at);
CREATE INDEX IF NOT EXISTS ix_alerts_status ON alerts (status, starts_at);
CREATE INDEX IF NOT EXISTS ix_alerts_alertname ON alerts (alertname, starts_at);
CREATE INDEX IF NOT EXISTS ix_alerts_severity ON alerts (severity);
CREATE TABLE IF NOT EXISTS notifications (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  sent_at TEXT NOT NULL, receiver TEXT NOT NULL, robot TEXT NOT NULL,
  request_id TEXT NOT NULL DEFAULT '', message_id INTEGER NOT NULL, alerts INTEGER NOT NULL,
  fingerprints TEXT, errcode INTEGER, errmsg TEXT NOT NULL DEFAULT '', latency_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_notifications_sent_at ON notifications (sent_at);
CREATE INDEX IF NOT EXISTS ix_notifications_receiver ON notifications (receiver, robot, sent_at);
CREATE TABLE IF NOT EXISTS recorder_progress (
  journal_id TEXT NOT NULL PRIMARY KEY, last_event_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS incidents (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  route TEXT NOT NULL, receiver TEXT NOT NULL, group_hash TEXT NOT NULL, open_group TEXT,
  group_key TEXT NOT NULL, group_labels TEXT NOT NULL, title TEXT NOT NULL DEFAULT '',
  level TEXT NOT NULL DEFAULT '', level_rank INTEGER, state TEXT NOT NULL, opened_at TEXT NOT NULL,
  acknowledged_at TEXT, acknowledged_by TEXT, resolved_at TEXT,
  escalations INTEGER NOT NULL DEFAULT 0, next_step_at TEXT NOT NULL, silence_id TEXT,
  silenced_until TEXT, steps_from TEXT, alerts_started_at TEXT, alerts_ended_at TEXT,
  source TEXT NOT NULL DEFAULT 'alertmanager', UNIQUE (route, open_group)
);
CREATE INDEX IF NOT EXISTS ix_incidents_next_step ON incidents (state, next_step_at);
CREATE INDEX IF NOT EXISTS ix_incidents_group ON incidents (route, group_hash, resolved_at);
CREATE INDEX IF NOT EXISTS ix_incidents_state ON incidents (state, opened_at);
CREATE INDEX IF NOT EXISTS ix_incidents_opened_at ON incidents (opened_at);
CREATE TABLE IF NOT EXISTS incident_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  incident_id INTEGER NOT NULL, at TEXT NOT NULL, kind TEXT NOT NULL,
  actor TEXT NOT NULL DEFAULT '', via TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ix_incident_events_incident ON incident_events (incident_id, at);
CREATE INDEX IF NOT EXISTS ix_incident_events_at ON incident_events (at);
CREATE TABLE IF NOT EXISTS incident_notes (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  note_key TEXT NOT NULL UNIQUE, incident_id INTEGER NOT NULL, route TEXT NOT NULL,
  kind TEXT NOT NULL, level TEXT NOT NULL DEFAULT '', text TEXT NOT NULL, mentions TEXT NOT NULL,
  created_at TEXT NOT NULL, relayed_by TEXT, sent_at TEXT
);
CREATE INDEX IF NOT EXISTS ix_incident_notes_unsent ON incident_notes (sent_at, created_at);
"""

_ALERT_COLUMNS = ("receiver, fingerprint, starts_at, ends_at, status, alertname, instance, "
                  "severity, job, summary, description, labels, annotations, generator_url, "
                  "first_received_at, last_received_at")
_ALERT_VALUES = "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s"
_ALERT_REFRESHED = ("status", "ends_at", "alertname", "instance", "severity", "job", "summary",
                    "description", "labels", "annotations", "generator_url", "last_received_at")


def _alert_refresh(new_value):
    return ", ".join(f"{c} = {new_value.format(c)}" for c in _ALERT_REFRESHED) + \
        ", received_count = received_count + 1"


# Upsert of one alert occurrence: the one explicit dialect difference in the statements.
S_ALERT_UPSERT_MYSQL = (f"INSERT INTO alerts ({_ALERT_COLUMNS}) VALUES ({_ALERT_VALUES}) "
                        f"ON DUPLICATE KEY UPDATE {_alert_refresh('VALUES({})')}")
S_ALERT_UPSERT_SQLITE = (f"INSERT INTO alerts ({_ALERT_COLUMNS}) VALUES ({_ALERT_VALUES}) "
                         f"ON CONFLICT (receiver, fingerprint, starts_at) DO UPDATE SET "
                         f"{_alert_refresh('excluded.{}')}")
S_ALERT_NOTIFIED = (
    "UPDATE alerts SET notified_count = notified_count + 1, robots = CASE "
    "WHEN robots = '' THEN %s "
    "WHEN INSTR(CONCAT(',', robots, ','), CONCAT(',', %s, ',')) > 0 "
    "OR LENGTH(robots) > 896 THEN robots "
    "ELSE CONCAT(robots, ',', %s) END "
    "WHERE receiver = %s AND fingerprint = %s AND starts_at = %s")
# notifications.receiver holds the route (the [receiver:NAME] section) that sent the message.
S_NOTIFICATION_ADD = ("INSERT INTO notifications (sent_at, receiver, robot, request_id, "
                      "message_id, alerts, fingerprints, errcode, errmsg, latency_ms) "
                      "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
# Incidents: one per route and Alertmanager group while it fires. open_group is the group's hash
# while the incident is open, NULL after: the unique key lets one incident be open per group
# whichever instances record the same webhooks. A notification belongs to an incident by its
# alerts' own times, not by when it arrived (an HA peer's copy comes peer_timeout late, a
# recorder replays its journal after a MySQL cut): alerts_started_at is the latest start of
# the incident's firing alerts, alerts_ended_at the latest end of the alerts that resolved it.
# A resolve changes an open incident only if its alerts ended after the incident's started (a
# late copy of the last incident's resolve leaves the next one, claimed, as it is). An open is
# skipped when the group was resolved at or after it arrived (a replay), or LATE_COPY before it
# by alerts that ended after these started (a peer's late copy). Only that short: a firing
# notification just like an earlier one (Prometheus back after resolve_timeout) is a new one.
_INCIDENT_OPEN = ("INTO incidents (route, receiver, group_hash, open_group, group_key, "
                  "group_labels, title, level, level_rank, state, opened_at, next_step_at, "
                  "alerts_started_at, source) "
                  "SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, 'open', %s, %s, %s, %s "
                  "FROM (SELECT 1 AS one) AS x "
                  "WHERE NOT EXISTS (SELECT 1 FROM incidents WHERE route = %s AND group_hash = %s "
                  "AND (resolved_at >= %s OR (alerts_ended_at >= %s AND resolved_at >= %s)))")
LATE_COPY = 30.0    # seconds: two Alertmanager peers' peer_timeout (15 s, the default) and more
S_INCIDENT_OPEN_MYSQL = "INSERT IGNORE " + _INCIDENT_OPEN    # the dialects' one difference here
S_INCIDENT_OPEN_SQLITE = "INSERT OR IGNORE " + _INCIDENT_OPEN
S_INCIDENT_OPEN_ID = "SELECT id FROM incidents WHERE route = %s AND open_group = %s"
# A higher level: level_rank is its place in the route's priority_order (0 first; NULL, an
# incident of 0.7: kept as it opened).
S_INCIDENT_LEVEL = ("UPDATE incidents SET level = %s, level_rank = %s, escalations = 0, "
                    "steps_from = %s, next_step_at = %s WHERE route = %s AND open_group = %s "
                    "AND level_rank > %s")
S_INCIDENT_FIRING = ("UPDATE incidents SET alerts_started_at = %s WHERE route = %s "
                     "AND open_group = %s AND (alerts_started_at IS NULL "
                     "OR alerts_started_at < %s)")
S_INCIDENT_RESOLVE = ("UPDATE incidents SET state = 'resolved', resolved_at = %s, "
                      "alerts_ended_at = %s, open_group = NULL WHERE route = %s "
                      "AND open_group = %s AND (alerts_started_at IS NULL OR %s IS NULL "
                      "OR alerts_started_at <= %s)")
S_INCIDENT_RESOLVED_ID = ("SELECT id FROM incidents WHERE route = %s AND group_hash = %s "
                          "AND resolved_at = %s ORDER BY id DESC LIMIT 1")
S_INCIDENT_ACKNOWLEDGE = ("UPDATE incidents SET state = 'acknowledged', acknowledged_at = %s, "
                          "acknowledged_by = %s WHERE route = %s AND open_group = %s "
                          "AND state = 'open'")
S_INCIDENT_OPEN_ROW = ("SELECT id, state, opened_at, acknowledged_at, acknowledged_by, title, "
                       "level, group_labels, silence_id, silenced_until, source FROM incidents "
                       "WHERE route = %s AND open_group = %s")
# Escalation. The escalator reads only the incidents whose next step is due (next_step_at), not
# every open one every second; a new incident's is LOOK_NOW (look at it once: its chain counts
# from its opening). steps_from is when the chain started (NULL: not looked at yet); a silence
# that ends starts the chain again from its end. These are wall-clock times, as every instance
# reads them; when the escalating instance sees its wall clock step (NTP, a hand-set date, a VM
# restored), it moves them by the step (S_INCIDENTS_TO_SHIFT), so that a step neither holds a
# step nor sends every one at once. silenced_until is the silence's end as Alertmanager has it.
LOOK_NOW = "1970-01-01 00:00:00.000"   # next_step_at of an incident not looked at yet
NEVER = "9998-01-01 00:00:00.000"      # a next_step_at for an incident that escalates no more
TAKING = "taking:"                     # silence_id while a silence is being made (its prefix)
S_INCIDENTS_DUE = ("SELECT id, route, level, opened_at, escalations, title, group_hash, "
                   "steps_from, silence_id, silenced_until FROM incidents "
                   "WHERE state = 'open' AND next_step_at <= %s ORDER BY next_step_at LIMIT %s")
S_INCIDENT_SCHEDULE = ("UPDATE incidents SET next_step_at = %s, steps_from = %s WHERE id = %s "
                       "AND escalations = %s AND state = 'open'")
S_INCIDENTS_RESCHEDULE = "UPDATE incidents SET next_step_at = %s WHERE state = 'open'"
S_INCIDENTS_TO_SHIFT = ("SELECT id, next_step_at, steps_from FROM incidents WHERE state = 'open' "
                        "AND silence_id IS NULL AND next_step_at > %s AND next_step_at < %s")
S_INCIDENT_SHIFT = ("UPDATE incidents SET next_step_at = %s, steps_from = %s WHERE id = %s "
                    "AND next_step_at = %s")
S_INCIDENT_SILENCE_UNTIL = ("UPDATE incidents SET silenced_until = %s, next_step_at = %s "
                            "WHERE id = %s AND silence_id = %s")
S_INCIDENT_ESCALATE = ("UPDATE incidents SET escalations = %s, next_step_at = %s, steps_from = %s "
                       "WHERE id = %s AND escalations = %s AND state = 'open' "
                       "AND silence_id IS NULL")
# A silence is taken first (compare-and-set: one of two taps, on any instance, gets it) with a
# TAKING id that lapses on its own if the instance dies before Alertmanager answers; then it
# holds the silence's id, or is dropped if Alertmanager refused.
S_INCIDENT_SILENCE_TAKE = ("UPDATE incidents SET silence_id = %s, silenced_until = %s, "
                           "next_step_at = %s WHERE id = %s AND open_group IS NOT NULL "
                           "AND (silence_id IS NULL OR silenced_until <= %s)")
S_INCIDENT_SILENCE = ("UPDATE incidents SET silence_id = %s, silenced_until = %s, "
                      "next_step_at = %s WHERE id = %s AND silence_id = %s "
                      "AND open_group IS NOT NULL")
S_INCIDENT_SILENCE_DROP = ("UPDATE incidents SET silence_id = NULL, silenced_until = NULL, "
                           "next_step_at = %s WHERE id = %s AND silence_id = %s")
S_INCIDENT_UNSILENCE = ("UPDATE incidents SET silence_id = NULL, silenced_until = NULL, "
                        "escalations = 0, steps_from = %s, next_step_at = %s "
                        "WHERE id = %s AND silence_id = %s AND open_group IS NOT NULL")
S_INCIDENTS_SILENCED = ("SELECT id, route, receiver, group_hash, group_labels, silence_id, "
                        "silenced_until FROM incidents WHERE open_group IS NOT NULL "
                        "AND silence_id IS NOT NULL ORDER BY id LIMIT %s")
S_INCIDENT_CLOSE = ("UPDATE incidents SET state = 'resolved', resolved_at = %s, open_group = NULL "
                    "WHERE id = %s AND open_group IS NOT NULL")
S_INCIDENTS_OPEN_BY_STATE = ("SELECT state, COUNT(*) FROM incidents "
                             "WHERE state IN ('open', 'acknowledged') GROUP BY state")
# What the group hears of its incidents (escalation steps, claims, silences) waits in the history
# until it is sent, whichever instance sends it: written in the transaction that decided it (a
# step marked done has its notes), copied into the journal of the instance that sends (see
# NoteRelay), marked sent when that send is recorded. note_key is its send key in a cluster.
_NOTE_ADD = ("INTO incident_notes (note_key, incident_id, route, kind, level, text, mentions, "
             "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")
S_NOTE_ADD_MYSQL = "INSERT IGNORE " + _NOTE_ADD     # a note made once: the same again is none
S_NOTE_ADD_SQLITE = "INSERT OR IGNORE " + _NOTE_ADD
# The notes a relay may journal: not sent, not made before `since`, not journaled by that relay
# already, and not of a route and kind whose message waits in its journal ({held}: one
# "AND NOT (route = %s AND kind = %s)" each): so that one route's notes held back, however many,
# never keep another's from its turn.
S_NOTES_UNSENT = ("SELECT note_key, incident_id, route, kind, level, text, mentions, created_at "
                  "FROM incident_notes WHERE sent_at IS NULL AND created_at >= %s "
                  "AND (relayed_by IS NULL OR relayed_by <> %s){held} ORDER BY id LIMIT %s")
S_NOTE_RELAYED = "UPDATE incident_notes SET relayed_by = %s WHERE note_key = %s"
S_NOTE_SENT = ("UPDATE incident_notes SET sent_at = %s WHERE note_key = %s "
               "AND sent_at IS NULL")
S_INCIDENT_EVENT_ADD = ("INSERT INTO incident_events (incident_id, at, kind, actor, via, detail) "
                        "VALUES (%s, %s, %s, %s, %s, %s)")
INCIDENT_COLUMNS = ("SELECT id, route, receiver, title, level, state, opened_at, acknowledged_at, "
                    "acknowledged_by, resolved_at, group_hash, escalations, next_step_at, "
                    "silence_id, silenced_until FROM incidents ")
S_INCIDENTS = INCIDENT_COLUMNS + "ORDER BY id DESC LIMIT %s"
S_INCIDENTS_STILL_OPEN = (INCIDENT_COLUMNS + "WHERE state IN ('open', 'acknowledged') "
                          "ORDER BY id DESC LIMIT %s")
S_INCIDENTS_STILL_OPEN_OF = (INCIDENT_COLUMNS + "WHERE route = %s AND state IN ('open', "
                             "'acknowledged') ORDER BY id DESC LIMIT %s")
S_INCIDENT = INCIDENT_COLUMNS + "WHERE id = %s"
S_INCIDENT_EVENTS = ("SELECT kind, at, actor, via, detail FROM incident_events "
                     "WHERE incident_id = %s ORDER BY id")
S_PROGRESS_GET = "SELECT last_event_id FROM recorder_progress WHERE journal_id = %s"
S_PROGRESS_PUT = "REPLACE INTO recorder_progress (journal_id, last_event_id) VALUES (%s, %s)"
S_PING = "SELECT 1"
# --check-config tries each privilege GRANTS_DOC lists with a statement the server checks it for
# first, and that then changes nothing: no row matches, the table to create has a duplicate
# column, the index or column to drop does not exist (MySQL's TRIAL_ERRORS, with the "no such
# table" of a database the daemon has not made its tables in yet).
S_PRIVILEGE_TRIALS = (
    ("SELECT", "SELECT 1 FROM alerts WHERE 1 = 0"),
    ("INSERT", "INSERT INTO alerts SELECT * FROM alerts WHERE 1 = 0"),
    ("UPDATE", "UPDATE alerts SET id = id WHERE 1 = 0"),
    ("DELETE", "DELETE FROM alerts WHERE 1 = 0"),
    ("CREATE", "CREATE TABLE alertbridge_privilege_trial (a INT, a INT)"),
    ("INDEX", "DROP INDEX alertbridge_privilege_trial ON alerts"),
    ("ALTER", "ALTER TABLE alerts DROP COLUMN alertbridge_privilege_trial"),
)
S_FIRING = ("SELECT receiver, alertname, severity, instance, summary, starts_at FROM alerts "
            "WHERE status = 'firing' ORDER BY starts_at DESC LIMIT %s")
S_FIRING_COUNT = "SELECT COUNT(*) FROM alerts WHERE status = 'firing'"
S_EARLIER = ("SELECT COUNT(*) FROM alerts WHERE receiver = %s AND fingerprint = %s "
             "AND starts_at >= %s AND starts_at < %s")
S_LAST_RESOLVED = ("SELECT starts_at, ends_at FROM alerts WHERE receiver = %s AND fingerprint = %s "
                   "AND starts_at < %s AND status = 'resolved' ORDER BY starts_at DESC LIMIT 1")
# An alert's key columns compare byte for byte, as in SQLite: the default collation would merge
# receivers differing by case or emoji into one history row. Tables made before 0.4 are altered.
S_MYSQL_KEYS_NOT_BINARY = ("SELECT COUNT(*) FROM information_schema.COLUMNS "
                           "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'alerts' "
                           "AND COLUMN_NAME IN ('receiver', 'fingerprint') "
                           "AND COLLATION_NAME <> 'utf8mb4_bin'")
S_MYSQL_KEYS_BINARY = ("ALTER TABLE alerts MODIFY receiver VARCHAR(128) "
                       "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, MODIFY fingerprint "
                       "VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL")
# Retention: one small batch per statement. The derived table lets MySQL take LIMIT in a subquery.
S_PURGE_ALERTS = ("DELETE FROM alerts WHERE id IN (SELECT id FROM (SELECT id FROM alerts "
                  "WHERE starts_at < %s AND last_received_at < %s ORDER BY id LIMIT %s) AS old)")
S_PURGE_NOTIFICATIONS = ("DELETE FROM notifications WHERE id IN (SELECT id FROM "
                         "(SELECT id FROM notifications WHERE sent_at < %s ORDER BY id LIMIT %s) "
                         "AS old)")
S_PURGE_INCIDENT_EVENTS = ("DELETE FROM incident_events WHERE id IN (SELECT id FROM (SELECT e.id "
                           "FROM incident_events e JOIN incidents i ON i.id = e.incident_id "
                           "WHERE i.resolved_at < %s ORDER BY e.id LIMIT %s) AS old)")
S_PURGE_INCIDENTS = ("DELETE FROM incidents WHERE id IN (SELECT id FROM (SELECT id FROM incidents "
                     "WHERE resolved_at < %s AND id NOT IN (SELECT incident_id FROM "
                     "incident_events) ORDER BY id LIMIT %s) AS old)")
S_PURGE_NOTES = ("DELETE FROM incident_notes WHERE id IN (SELECT id FROM (SELECT id FROM "
                 "incident_notes WHERE created_at < %s ORDER BY id LIMIT %s) AS old)")
# Columns that tables made by an older version lack: (table, column, its MySQL type, SQLite's).
# Identifiers and types are these constants, never a value.
HISTORY_COLUMNS = (
    ("incidents", "steps_from", "DATETIME(3) NULL", "TEXT"),             # 0.8
    ("incidents", "alerts_started_at", "DATETIME(3) NULL", "TEXT"),
    ("incidents", "alerts_ended_at", "DATETIME(3) NULL", "TEXT"),
    ("incidents", "level_rank", "INT NULL", "INTEGER"),
    ("incidents", "source", "VARCHAR(16) NOT NULL DEFAULT 'alertmanager'",          # 0.9
     "TEXT NOT NULL DEFAULT 'alertmanager'"),
)
S_MYSQL_COLUMNS = ("SELECT COLUMN_NAME FROM information_schema.COLUMNS "
                   "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s")
S_SQLITE_COLUMNS = "SELECT name FROM pragma_table_info(%s)"


# The cluster's shared state, next to the history (MySQL only): C_* statements. Times are the
# database's (UNIX_TIMESTAMP(NOW(6))), one clock for every instance whatever their hosts' say.
CLUSTER_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_leader (
  id TINYINT UNSIGNED NOT NULL,
  holder VARCHAR(128) NOT NULL,
  until DOUBLE NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS cluster_claims (
  claim_key CHAR(64) CHARACTER SET ascii NOT NULL,
  owner VARCHAR(128) NOT NULL,
  claimed_at DOUBLE NOT NULL,
  sent_at DOUBLE NULL,
  PRIMARY KEY (claim_key),
  KEY ix_cluster_claims_claimed_at (claimed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS cluster_sends (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  robot_key CHAR(16) CHARACTER SET ascii NOT NULL,
  at DOUBLE NOT NULL,
  errcode INT NULL,
  PRIMARY KEY (id),
  KEY ix_cluster_sends_at (at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS cluster_members (
  instance VARCHAR(64) CHARACTER SET ascii NOT NULL,
  incarnation CHAR(32) CHARACTER SET ascii NOT NULL,
  host VARCHAR(255) NOT NULL,
  pid INT NOT NULL,
  seen_at DOUBLE NOT NULL,
  PRIMARY KEY (instance)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS cluster_handoff (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  origin VARCHAR(64) CHARACTER SET ascii NOT NULL,
  route VARCHAR(255) NOT NULL,
  request_id VARCHAR(255) NOT NULL,
  body LONGTEXT NOT NULL,
  packed TINYINT NOT NULL,
  priority INT NOT NULL,
  level VARCHAR(64) NOT NULL,
  claims TEXT NOT NULL,
  age DOUBLE NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
"""
C_LEADER_ROW = "INSERT IGNORE INTO cluster_leader (id, holder, until) VALUES (1, '', 0)"
# The lease: taken, or kept, in one atomic statement; one row changed means this instance leads.
C_LEAD = ("UPDATE cluster_leader SET holder = %s, until = UNIX_TIMESTAMP(NOW(6)) + %s "
          "WHERE id = 1 AND (holder = %s OR until < UNIX_TIMESTAMP(NOW(6)))")
C_TAKE = ("INSERT IGNORE INTO cluster_claims (claim_key, owner, claimed_at) "
           "VALUES (%s, %s, UNIX_TIMESTAMP(NOW(6)))")
C_SEND_KEYS_OF = ("SELECT claim_key, owner, sent_at, UNIX_TIMESTAMP(NOW(6)) - sent_at "
               "FROM cluster_claims WHERE claim_key IN ({keys})")   # {keys}: one %s per key
C_RETAKE = ("UPDATE cluster_claims SET owner = %s, claimed_at = UNIX_TIMESTAMP(NOW(6)), "
             "sent_at = NULL WHERE claim_key = %s "
             "AND (sent_at IS NULL OR sent_at < UNIX_TIMESTAMP(NOW(6)) - %s)")
C_SENT = "UPDATE cluster_claims SET sent_at = UNIX_TIMESTAMP(NOW(6)) WHERE claim_key = %s"
C_SENT_LATE = ("INSERT INTO cluster_claims (claim_key, owner, claimed_at, sent_at) "
               "VALUES (%s, %s, UNIX_TIMESTAMP(NOW(6)), UNIX_TIMESTAMP(NOW(6))) "
               "ON DUPLICATE KEY UPDATE sent_at = COALESCE(sent_at, VALUES(sent_at))")
C_SENT_AMONG = ("SELECT claim_key FROM cluster_claims "
                "WHERE sent_at IS NOT NULL AND claim_key IN ({keys})")
C_SEND_ADD = ("INSERT INTO cluster_sends (robot_key, at, errcode) "
              "VALUES (%s, UNIX_TIMESTAMP(NOW(6)), %s)")
C_SENDS_SINCE = ("SELECT robot_key, at - UNIX_TIMESTAMP(NOW(6)), errcode FROM cluster_sends "
                 "WHERE at > UNIX_TIMESTAMP(NOW(6)) - %s ORDER BY at")  # at: seconds ago, negative
C_PURGE_SEND_KEYS = ("DELETE FROM cluster_claims "
                  "WHERE claimed_at < UNIX_TIMESTAMP(NOW(6)) - %s LIMIT 1000")
C_PURGE_SENDS = "DELETE FROM cluster_sends WHERE at < UNIX_TIMESTAMP(NOW(6)) - %s LIMIT 1000"
# Membership: each instance checks in every lease/3 seconds. The row is the name's: a second
# process with the same name (incarnation differs) finds it fresh, leaves it as it is and stays
# out of the lease. One statement: the assignments run in order, each seeing the ones before.
C_CHECK_IN = ("INSERT INTO cluster_members (instance, incarnation, host, pid, seen_at) "
              "VALUES (%s, %s, %s, %s, UNIX_TIMESTAMP(NOW(6))) ON DUPLICATE KEY UPDATE "
              "host = IF(incarnation = VALUES(incarnation) OR seen_at < VALUES(seen_at) - %s, "
              "VALUES(host), host), "
              "pid = IF(incarnation = VALUES(incarnation) OR seen_at < VALUES(seen_at) - %s, "
              "VALUES(pid), pid), "
              "incarnation = IF(incarnation = VALUES(incarnation) "
              "OR seen_at < VALUES(seen_at) - %s, VALUES(incarnation), incarnation), "
              "seen_at = IF(incarnation = VALUES(incarnation), VALUES(seen_at), seen_at)")
C_MEMBER_OF = "SELECT incarnation, host, pid FROM cluster_members WHERE instance = %s"
C_MEMBERS_ALIVE = ("SELECT instance FROM cluster_members WHERE instance <> %s "
                   "AND seen_at >= UNIX_TIMESTAMP(NOW(6)) - %s ORDER BY instance")
C_LEAVE = "DELETE FROM cluster_members WHERE instance = %s AND incarnation = %s"
C_PURGE_MEMBERS = "DELETE FROM cluster_members WHERE seen_at < UNIX_TIMESTAMP(NOW(6)) - %s"
# Send keys known to the cluster: the leader registers those of every message it journals; a
# standby hands the leader, through cluster_handoff, what it journaled and the leader has not.
C_SEND_KEYS_KNOWN = "SELECT claim_key FROM cluster_claims WHERE claim_key IN ({keys})"
C_HAND_OFF = ("INSERT INTO cluster_handoff (origin, route, request_id, body, packed, priority, "
              "level, claims, age) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")
C_HANDED = ("SELECT id, route, request_id, body, packed, priority, level, claims, age "
            "FROM cluster_handoff ORDER BY id LIMIT %s")
C_ADOPTED = "DELETE FROM cluster_handoff WHERE id = %s"


def statements(script):
    return [s.strip() for s in script.split(";") if s.strip()]


LOGIN_REFUSED = "login refused: check [database] user and password"     # MySQL's 1045
GRANTS_DOC = 'docs/operations.md, "History in MySQL"'   # the privileges the daemon needs


class Dialect:
    """What differs between the history's two databases, and nothing else: placeholders,
    connecting, the schema and its migration, the upsert, the insert that skips a duplicate,
    and which errors mean "not now"."""
    name = param = schema = upsert = open_incident = add_note = None

    def sql(self, statement):
        """The one placeholder helper: %s as written -> this driver's."""
        return statement if self.param == "%s" else statement.replace("%s", self.param)

    def connect(self, settings):
        raise NotImplementedError

    def missing_driver(self):
        """Why this Python cannot use the database's driver, with how to install it; "" if it
        can."""
        return ""

    columns_of = None       # the statement that lists a table's columns

    def migrate(self, cursor, say):
        """Bring tables made by older versions up to date; say(text) logs a step once."""
        for table, column, mysql_type, sqlite_type in HISTORY_COLUMNS:
            cursor.execute(self.sql(self.columns_of), (table,))
            if column not in {row[0] for row in cursor.fetchall()}:
                say(f"history: adding {table}.{column} (ALTER TABLE, once)")
                kind = mysql_type if self.name == "mysql" else sqlite_type
                cursor.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def unavailable(self, exc):
        """Whether `exc` means "not now" rather than "never": the database is unreachable, or a
        table is gone (dropped, a restore under way), which reconnecting creates again; or a
        privilege is missing, which a GRANT gives."""
        return isinstance(exc, OSError)

    def denied(self, exc):
        """Whether `exc` is a missing privilege (an operator's GRANT, not the network)."""
        return False

    def refusal(self, exc, settings):
        """What the server's refusal of the login (`exc`) tells whoever edits [database]; ""
        if it is no such refusal."""
        return ""

    def trial_passed(self, exc):
        """Whether a statement of S_PRIVILEGE_TRIALS failed as written to, its privilege there."""
        return False

    def conflict(self, exc):
        """Whether `exc` ended a transaction another one was in the way of (a deadlock): it
        was rolled back, and the same transaction again may well succeed."""
        return False


def _concat(*parts):
    """MySQL's CONCAT for SQLite, so that one statement serves both."""
    return "".join("" if p is None else str(p) for p in parts)


class SQLiteDialect(Dialect):
    name, param, schema, upsert = "sqlite", "?", SQLITE_SCHEMA, S_ALERT_UPSERT_SQLITE
    open_incident, columns_of, add_note = (S_INCIDENT_OPEN_SQLITE, S_SQLITE_COLUMNS,
                                           S_NOTE_ADD_SQLITE)

    def connect(self, settings):
        os.makedirs(os.path.dirname(os.path.abspath(settings.path)), exist_ok=True)
        db = sqlite3.connect(settings.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.create_function("CONCAT", -1, _concat)
        return db

    def unavailable(self, exc):
        # an OperationalError is also SQLite's "no such table"
        return super().unavailable(exc) or isinstance(exc, sqlite3.OperationalError)


class MySQLDialect(Dialect):
    name, param, schema, upsert = "mysql", "%s", MYSQL_SCHEMA, S_ALERT_UPSERT_MYSQL
    open_incident, columns_of, add_note = (S_INCIDENT_OPEN_MYSQL, S_MYSQL_COLUMNS,
                                           S_NOTE_ADD_MYSQL)

    def connect(self, settings):
        missing = self.missing_driver()
        if missing:
            raise StoreUnavailable(missing)
        import pymysql
        return pymysql.connect(host=settings.host, port=settings.port, user=settings.user,
                               password=settings.password, database=settings.database,
                               charset="utf8mb4", autocommit=False, connect_timeout=5,
                               read_timeout=30, write_timeout=30)

    def missing_driver(self):
        try:
            import pymysql  # noqa: F401
        except ImportError:
            return (f"driver = mysql needs pymysql, which {sys.executable} cannot import: "
                    f"install python3-pymysql (Debian, Ubuntu) or python3-PyMySQL (RHEL), or "
                    f"pip install pymysql")
        return ""

    def migrate(self, cursor, say):
        super().migrate(cursor, say)
        cursor.execute(S_MYSQL_KEYS_NOT_BINARY)
        if cursor.fetchone()[0]:
            say("history: making alerts.receiver and alerts.fingerprint compare byte for byte "
                "(ALTER TABLE, once; it rebuilds the table)")
            cursor.execute(S_MYSQL_KEYS_BINARY)

    DENIED = frozenset({1044, 1045, 1142, 1143, 1227, 1370})   # access, command, column denied
    # deadlock, lock wait timeout; and what InnoDB says of an auto-increment an INSERT ... SELECT
    # racing another could not take (MariaDB 10.11)
    CONFLICTS = frozenset({1213, 1205, 1467})

    def conflict(self, exc):
        import pymysql
        return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and \
            exc.args[0] in self.CONFLICTS

    def denied(self, exc):
        import pymysql
        return isinstance(exc, pymysql.err.MySQLError) and bool(exc.args) and \
            exc.args[0] in self.DENIED

    TRIAL_ERRORS = frozenset({1146, 1060, 1091})    # no such table, duplicate column, no such key

    def refusal(self, exc, settings):
        return {1045: LOGIN_REFUSED,
                1049: f"no database {settings.database} on the server: create it ({GRANTS_DOC})",
                1044: f"the user has no privilege on database {settings.database}: grant what "
                      f"{GRANTS_DOC} lists"}.get(self._code(exc), "")

    def trial_passed(self, exc):
        return self._code(exc) in self.TRIAL_ERRORS

    @staticmethod
    def _code(exc):
        import pymysql
        return exc.args[0] if isinstance(exc, pymysql.err.MySQLError) and exc.args else None

    def unavailable(self, exc):
        import pymysql
        errors = pymysql.err
        if super().unavailable(exc) or isinstance(exc, (errors.OperationalError,
                                                         errors.InterfaceError)):
            return True
        return isinstance(exc, errors.ProgrammingError) and exc.args[:1] == (1146,)  # no such table


DIALECTS = {"sqlite": SQLiteDialect(), "mysql": MySQLDialect()}
SQLITE = DIALECTS["sqlite"]


class Signal:
    """Wakes whoever listens when a writer has news, as queue.Queue.put notifies its consumers:
    writers never reach into the workers that read."""

    def __init__(self):
        self._listeners = []

    def listen(self, callback):
        self._listeners.append(callback)

    def notify(self, *args):
        for callback in self._listeners:
            callback(*args)


def bodies_of(route, webhook):
    """A webhook as messages: ((rank, level), Body) for each priority level present, the
    highest first, so that an alert never waits behind, or goes out with, lower ones (with
    per_alert, one message per alert). Without send_resolved, resolved alerts are only
    recorded, not sent."""
    alerts = webhook.alerts
    if not route.send_resolved:
        alerts = [a for a in alerts if a["status"] == "firing"]
    if route.per_alert:
        groups = sorted(((route.level(a), [a]) for a in alerts), key=lambda item: item[0])
    else:
        levels = {}
        for alert in alerts:
            levels.setdefault(route.level(alert), []).append(alert)
        groups = sorted(levels.items())
    return [(level, Body(alerts=tuple(group), truncated=webhook.truncated,
                         group_labels=webhook.group_labels, group_key=webhook.group_key))
            for level, group in groups]


def writable_problem(path):
    """Why a file cannot be written or made at `path` (its directory made if missing); None if
    it can. What is checked: the nearest existing directory above it, and the file itself."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if os.path.isdir(path):
            return "is a directory"
        return None if os.access(path, os.R_OK | os.W_OK) else "not writable (permissions)"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} not writable (permissions)"
    return None


class Journal:
    """The local durable queue (SQLite, WAL). Writes go through one connection under one lock,
    so SQLite never has to busy-wait, which keeps the webhook ack fast; every reading thread
    gets its own connection. `new_messages` (with the route's name) and `new_events` tell
    the workers when there is something for them. `failed_at` is when a write last failed, until
    one succeeds again."""

    BODIES_KEPT = 512

    def __init__(self, path, sync="full", clock=None, wall=wall_time):
        self.path = path
        self.sync = sync
        self.clock = clock or SteadyClock(wall)     # every time the journal keeps
        self.wall = wall                            # when a webhook came, for the history
        self.new_messages = Signal()
        self.new_events = Signal()
        self.failed_at = None       # time.monotonic() of the last failed write, while failing
        self._local = threading.local()     # each reading thread's own connection
        self._write_lock = threading.Lock() # every write, on the one writing connection
        self._queue_lock = threading.Lock() # _queue; taken inside _write_lock, never around it
        self._queue = []            # webhooks waiting for the next group commit
        self._bodies = Recent(self.BODIES_KEPT)     # message id -> Body, the newest read
        problem = writable_problem(path)
        if problem:
            raise StartError(f"journal {path}: {problem}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock_file = self._lock(path + ".lock")
        if os.path.exists(path) and os.path.getsize(path) == 0:  # we never leave one this way
            raise self._damaged("it is empty (0 bytes): it was truncated")
        try:
            self._writer = self._connect()
            with self._writing() as db:
                for statement in statements(JOURNAL_TABLES):
                    db.execute(statement)
                for table, column, migration in JOURNAL_MIGRATIONS:
                    if column not in {row[0] for row in self._run(db, J_COLUMNS, (table,))}:
                        db.execute(migration)
                for statement in statements(JOURNAL_INDEXES):
                    db.execute(statement)
                self._run(db, J_META_PUT, ("journal_id", uuid.uuid4().hex))
            self.journal_id = self._read_one(J_META_GET, ("journal_id",))[0]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise self._damaged(f"SQLite says: {exc}") from exc

    @staticmethod
    def _lock(path):
        """One daemon per journal: a second one (a second unit, a manual start during an
        incident) would send every message twice. The lock goes with the process."""
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StartError(f"journal {path[:-5]} is in use by another alertbridge (pid "
                             f"{holder}): one daemon per journal; stop that one, or give this "
                             f"one a state_dir of its own")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return lock

    def unlock(self):
        """Let the next daemon have the journal (at stop, whatever still runs of this one)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def close(self):
        self.unlock()
        with self._write_lock, contextlib.suppress(sqlite3.Error):
            self._writer.close()

    def _damaged(self, why):
        return JournalDamaged(f"journal {self.path} cannot be used, {why}. Move it aside "
                              f"(mv {self.path} {self.path}.damaged) and start again: a new "
                              f"journal is made; messages not yet sent and alerts not yet "
                              f"recorded stay in the old file")

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.sync.upper()}")  # validated: full or normal
        return db

    def _db(self):
        """This thread's reading connection, with a small page cache: a dozen threads read, and
        the file's pages are in the OS's cache anyway."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            db.execute("PRAGMA cache_size=-256")        # KiB
        return db

    @contextlib.contextmanager
    def _writing(self, probe=False):
        with self._write_lock:
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error:
                self.failed_at = time.monotonic()
                with contextlib.suppress(sqlite3.Error):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                raise
            if not probe:
                self.failed_at = None

    def _run(self, db, sql, params=()):
        return db.execute(SQLITE.sql(sql), params)

    def _read(self, sql, params=()):
        return self._run(self._db(), sql, params).fetchall()

    def _read_one(self, sql, params=()):
        return self._run(self._db(), sql, params).fetchone()

    # intake
    def add_webhook(self, webhook, route, request_id):
        """Journal one webhook: an event for the recorder and its message(s) for the route's
        sender. Returns once it is committed. Group commit: whichever request thread holds the
        write lock commits every webhook queued by then in one transaction (one fsync), so
        concurrent webhooks share the cost of durability instead of queueing for it one by one."""
        now = self.clock()
        received = datetime.fromtimestamp(self.wall(), timezone.utc)
        event = webhook_event(webhook, request_id, received, route)
        rows = [(J_EVENT_ADD, ("webhook", json.dumps(event, ensure_ascii=False), now))]
        for (rank, level), body in bodies_of(route, webhook):
            alerts = body.alerts
            body = json.dumps(body.to_json(), ensure_ascii=False)
            rows.append((J_MESSAGE_ADD, (route.name, request_id, body, 0, now, now, rank, level,
                                         alert_keys(alerts), send_key(webhook, level, alerts),
                                         1)))
        pending = _PendingWrite(rows)
        with self._queue_lock:
            self._queue.append(pending)
        with self._write_lock:
            if not pending.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    self._commit(batch)
                    self.failed_at = None
                except sqlite3.Error as exc:
                    self.failed_at = time.monotonic()
                    for item in batch:
                        item.error = exc
                for item in batch:
                    item.done = True
        if pending.error:
            raise pending.error
        self.new_events.notify()
        self.new_messages.notify(route.name)

    def _commit(self, batch):
        db = self._writer
        by_statement = {}
        for item in batch:
            for sql, params in item.rows:
                by_statement.setdefault(sql, []).append(params)
        db.execute("BEGIN IMMEDIATE")
        # Few calls into SQLite: the lock holder gives up the GIL, and waits for it, less often.
        try:
            for sql, rows in by_statement.items():
                db.executemany(SQLITE.sql(sql), rows)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            raise

    # recorder
    def unrecorded(self, limit=500, max_bytes=8 << 20):
        """The oldest events not yet recorded, bodies as JSON text (the store process parses them):
        at most `limit`, and no more than about `max_bytes` of bodies."""
        events, size = [], 0
        with contextlib.closing(self._run(self._db(), J_EVENTS_UNRECORDED, (limit,))) as rows:
            for event_id, kind, body in rows:  # closed even when cut short: no read left open
                if events and size + len(body) > max_bytes:
                    break
                events.append((event_id, kind, body))
                size += len(body)
        return events

    def mark_recorded(self, upto_id):
        with self._writing() as db:
            self._run(db, J_EVENTS_MARK_UPTO, (upto_id,))

    def mark_failed(self, event_id):
        with self._writing() as db:
            self._run(db, J_EVENTS_MARK, (2, event_id))

    # notifier
    def pending_routes(self):
        return [row[0] for row in self._read(J_MESSAGE_ROUTES)]

    def due_messages(self, route, now, limit=200):
        """Messages due, the highest priority first, then the oldest; each body is read only if
        it is used (see Message.body). The default limit is more than one digest takes."""
        rows = self._read(J_MESSAGES_DUE, (route, now, limit))
        return [Message(i, route, rid, bool(packed), attempts, created, rank, level, keys.split(),
                        self, bool(reserve))
                for i, rid, packed, attempts, created, rank, level, keys, reserve in rows]

    def pending_send_keys(self, limit=500):
        """(message id, [send key, ...]) of the oldest pending messages."""
        return [(i, keys.split()) for i, keys in self._read(J_MESSAGES_SEND_KEYS, (limit,))]

    def send_keys_since(self, after_id, limit=2000):
        """(message id, [send key, ...]) of every message after `after_id`, oldest first."""
        return [(i, keys.split()) for i, keys in self._read(J_SEND_KEYS_SINCE, (after_id, limit))]

    def unseen(self, after_id, older_than, limit=200):
        """Pending messages after `after_id` made before `older_than`, whole, as a standby hands
        them to its leader: (id, route, request_id, body, packed, priority, level, keys, age)."""
        now = self.clock()
        return [(*row[:7], row[7].split(), now - row[8])
                for row in self._read(J_MESSAGES_UNSEEN, (after_id, older_than, limit))]

    def holds_send_key(self, key):
        """Whether a message here carries the send key (a full scan: for rare handoffs); not
        one this instance handed off itself: the leader it went to may have died with it."""
        return self._read_one(J_SEND_KEY_HELD, (key,)) is not None

    def adopt(self, route, request_id, body, packed, priority, level, send_keys, age):
        """A message another instance journaled, handed over to this one to send."""
        now = self.clock()
        with self._writing() as db:
            self._run(db, J_MESSAGE_ADD, (route, request_id, body, int(packed), now - age, now,
                                          priority, level, alert_keys(json.loads(body)["alerts"]),
                                          " ".join(send_keys), 1))
        self.new_messages.notify(route)

    def note(self, route, title, text, rank, send_keys, level=NO_LEVEL, mention=Mentions(),
             request_id="note", reserve=True, age=0.0, relayed=False):
        """Journal a NOTE for a route's group at `rank` and `level`, packed so that it is never
        folded into a digest, carrying `send_keys` (so that it goes out once across a cluster);
        `reserve`: whether it may use the robots' reserve when its level may. `relayed`: the
        send keys are incident notes of the history (see NoteRelay), kept as relayed in the same
        transaction, so that this journal takes a note once. Returns the message's id."""
        body = json.dumps(Body(kind=NOTE, title=title, note=text, mention=mention).to_json(),
                          ensure_ascii=False)
        now = self.clock()
        with self._writing() as db:
            for key in send_keys if relayed else ():
                self._run(db, J_RELAYED_ADD, (key, now))
            message = self._run(db, J_MESSAGE_ADD, (
                route, request_id, body, 1, now - age, now, rank, level, "", " ".join(send_keys),
                int(reserve))).lastrowid
        self.new_messages.notify(route)
        return message

    def relayed(self, key):
        """Whether this journal has taken the note of that key."""
        return self._read_one(J_RELAYED, (key,)) is not None

    def pending(self, message_id):
        """Whether a message waits to be sent still."""
        row = self._read_one(J_MESSAGE_STATE, (message_id,))
        return row is not None and row[0] == "pending"

    def alert_keys_since(self, route, after_id):
        """(message id, [alert key, ...]) of the route's pending messages after `after_id`."""
        rows = self._read(J_MESSAGE_KEYS, (route, after_id))
        return [(message_id, keys.split("\x1e") if keys else []) for message_id, keys in rows]

    def body(self, message_id):
        """A message's body, as read before if it was lately: a message's body never changes
        (ids are never reused), and the renderer knows the alerts it rendered by identity, so
        a storm's sender does not parse and render its backlog again at each digest."""
        kept = self._bodies.get(message_id)
        if kept is None:
            kept = self._bodies.put(message_id, Body.from_json(json.loads(
                self._read_one(J_MESSAGE_BODY, (message_id,))[0])))
        return kept

    def next_due_at(self, route):
        return self._read_one(J_MESSAGE_NEXT_DUE, (route,))[0]

    # the app's cards: which one shows a group's open incident (see AppPager)
    def open_card(self, route, group):
        row = self._read_one(J_CARD_OPEN, (route, group))
        return row[0] if row else None

    def card_opened(self, route, group, track):
        with self._writing() as db:
            self._run(db, J_CARD_ADD, (track, route, group, self.clock()))

    def card_closed(self, track):
        with self._writing() as db:
            self._run(db, J_CARD_CLOSE, (self.clock(), track))

    def pending_count(self, route):
        return self._read_one(J_MESSAGES_WAITING, (route,))[0]

    def replace(self, old, new_bodies, state, send_keys=None):
        """Swap messages for new ones in one transaction: merged into a digest, or split; with
        no new bodies, just finish the old ones in `state`. The new messages carry the send keys of
        the old (`send_keys`: a list per new body). Returns the new messages."""
        now = self.clock()
        request_ids = ",".join(dict.fromkeys(",".join(m.request_id for m in old).split(",")))[:255]
        created, first = min(m.created_at for m in old), old[0]
        new = []
        with self._writing() as db:
            for message in old:
                self._run(db, J_MESSAGE_FINISH, (state, now, "", message.id))
            for body, carried in zip(new_bodies, send_keys or [[]] * len(new_bodies)):
                text = json.dumps(body.to_json(), ensure_ascii=False)
                cursor = self._run(db, J_MESSAGE_ADD, (
                    first.route, request_ids, text, 1, created, now, first.rank, first.level,
                    alert_keys(body.alerts), " ".join(carried), int(first.reserve)))
                new.append(Message(cursor.lastrowid, first.route, request_ids, True, 0, created,
                                   first.rank, first.level, carried, self, first.reserve, body))
        return new

    def supersede(self, old, heirs):
        """Finish messages whose every alert goes out in a later message ("merged"), and give
        each one's send keys to that message (`heirs`: message id -> send keys): a notification
        is sent when what carries it now is, never before."""
        now = self.clock()
        with self._writing() as db:
            for message in old:
                self._run(db, J_MESSAGE_FINISH, ("merged", now, "", message.id))
            for message_id, keys in heirs.items():
                self._run(db, J_SEND_KEYS_ADD, (" ".join(keys), message_id))

    def finish(self, message_ids, state):
        """Finish messages without sending them (a cluster's duplicates, or handed off)."""
        with self._writing() as db:
            rows = [(state, self.clock(), "", message_id) for message_id in message_ids]
            db.executemany(SQLITE.sql(J_MESSAGE_FINISH), rows)

    def retry_later(self, message_id, at, error):
        with self._writing() as db:
            self._run(db, J_MESSAGE_RETRY, (at, error[:500], message_id))

    def begin_send(self, robot_name, robot_key, latest_arrival):
        """Write ahead that a request to DingTalk is about to go out. If we crash before its
        answer, the restarted daemon still counts it against the robot's budget, dated as late
        as DingTalk could have received it."""
        with self._writing() as db:
            return self._run(db, J_SEND_BEGIN, (robot_name, robot_key, latest_arrival)).lastrowid

    def end_send(self, send_id, robot_name, robot_key, at, errcode, event, delivered=None):
        """Date the request by its answer (send_id None: it had no write-ahead record), add an
        event for the recorder and, if the request delivered a message, mark it sent: one
        transaction, so a crash cannot resend it."""
        with self._writing() as db:
            if send_id is None:
                self._run(db, J_SEND_ADD, (robot_name, robot_key, at, errcode))
            else:
                self._run(db, J_SEND_END, (at, errcode, send_id))
            self._run(db, J_EVENT_ADD, ("send", json.dumps(event, ensure_ascii=False), at))
            if delivered is not None:
                self._run(db, J_MESSAGE_FINISH, ("sent", at, "", delivered))
        self.new_events.notify()

    def recent_sends(self, since):
        return self._read(J_SENDS_SINCE, (since,))

    def bring_forward(self, longest_wait):
        """At start: no time an earlier run kept may lie ahead of this run's clock by more
        than it could (a retry `longest_wait` away): a wall clock stepped back between the runs
        would otherwise hold messages and budgets for the length of the step."""
        now = self.clock()
        with self._writing() as db:
            self._run(db, J_FORWARD_DUE, (now, now + longest_wait))
            self._run(db, J_FORWARD_CREATED, (now, now))
            self._run(db, J_FORWARD_SENDS, (now, now))

    def expire(self, older_than):
        """Mark messages nobody could send in time as expired (kept, never deleted)."""
        rows = self._read(J_MESSAGES_EXPIRE, (older_than,))  # a read first: expiry is rare
        if rows:
            with self._writing() as db:
                for message_id, _, _ in rows:
                    self._run(db, J_MESSAGE_FINISH,
                              ("expired", self.clock(), "max_age exceeded", message_id))
        return rows

    # housekeeping and introspection
    def purge(self, older_than, relayed_before=None):
        """Drop what is done and older than `older_than` (and relayed note keys older than
        `relayed_before`: kept while the history may offer their notes again)."""
        with self._writing() as db:
            for sql in (J_PURGE_EVENTS, J_PURGE_MESSAGES, J_PURGE_SENDS):
                self._run(db, sql, (older_than,))
            self._run(db, J_PURGE_RELAYED, (min(older_than, relayed_before or older_than),))

    def backlog(self):
        """(pending messages, oldest pending message time, unrecorded events, oldest event time)."""
        return tuple(self._read_one(J_MESSAGES_BACKLOG)) + tuple(self._read_one(J_EVENTS_BACKLOG))

    def waiting_by_level(self):
        """(level, messages waiting, oldest creation time) for each level that has some."""
        return self._read(J_MESSAGES_BY_LEVEL)

    def message_states(self):
        return dict(self._read(J_MESSAGES_STATES))

    def queue_by_route(self):
        """{route: ({level: (messages waiting, oldest creation time)}, messages expired)}"""
        queues = {}
        for route, level, waiting, oldest in self._read(J_QUEUE_BY_ROUTE):
            queues.setdefault(route, ({}, 0))[0][level] = (waiting, oldest)
        for route, expired in self._read(J_EXPIRED_BY_ROUTE):
            queues[route] = (queues.get(route, ({}, 0))[0], expired)
        return queues

    def writable(self, quiet=30.0):
        """Whether the journal takes writes: a small real write succeeds, and no other write
        failed in the last `quiet` seconds (a probe can fit where a webhook does not)."""
        try:
            with self._writing(probe=True) as db:
                self._run(db, J_PROBE, (str(time.time()),))
        except sqlite3.Error:
            return False
        failed = self.failed_at
        return failed is None or time.monotonic() - failed > quiet


@dataclass
class _PendingWrite:
    rows: list
    done: bool = False
    error: Exception = None


@dataclass
class Message:
    """One message waiting in the journal: where it is kept, and its Body, read only if used
    (a storm wakes a sender often, to look at the first message due alone)."""
    id: int
    route: str
    request_id: str
    packed: bool        # already a digest or a split part: merging it again gains nothing
    attempts: int
    created_at: float
    rank: int           # its level's place in the route's priority_order: 0 first
    level: str          # "critical", ... or NO_LEVEL
    send_keys: list        # the keys of the notifications it carries (see send_key)
    journal: Journal = field(repr=False)
    reserve: bool = True    # may use the robots' reserve if its level may (not an escalation)
    loaded: Body = field(default=None, repr=False)     # the body, once read or given

    @property
    def body(self):
        if self.loaded is None:
            self.loaded = self.journal.body(self.id)
        return self.loaded

    @property
    def alerts(self):
        return self.body.alerts

    @property
    def notes(self):
        """The keys of the incident notes it carries: a NOTE's send keys."""
        return self.send_keys if self.body.kind == NOTE else []

    def narrowed(self, alerts):
        """The message as it goes out with only these of its alerts (the journal keeps all)."""
        return replace(self, loaded=replace(self.body, alerts=tuple(alerts)))


class Store:
    """The alert history: MySQL in production, SQLite embedded. Used by the recorder thread.
    With another `schema` (the cluster's), the same session handling for other tables."""

    def __init__(self, settings, schema=None, autocommit=False):
        self.settings = settings            # a Database
        self.dialect = DIALECTS[settings.driver]
        self.schema = schema                # None: the history's, migrated
        self.autocommit = autocommit        # each statement its own transaction
        self._db = None
        self._said = set()

    def _say_once(self, text):
        if text not in self._said:
            self._said.add(text)
            log.warning("%s", text)

    def describe(self):
        return self.settings.describe()

    def _connect(self):
        self._db = self.dialect.connect(self.settings)
        self.ensure_schema()
        if self.autocommit:
            self._db.autocommit(True)

    @contextlib.contextmanager
    def transaction(self):
        """A cursor inside one transaction; StoreUnavailable when the database is unreachable."""
        try:
            if self._db is None:
                self._connect()
            cursor = self._db.cursor()
            try:
                yield cursor
                self._db.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    self._db.rollback()
                raise
            finally:
                cursor.close()
        except Exception as exc:
            if self.dialect.conflict(exc):
                raise StoreConflict(str(exc)) from exc
            if not self.dialect.unavailable(exc):
                raise
            self.close()
            refused = self.dialect.refusal(exc, self.settings) == LOGIN_REFUSED
            raise StoreUnavailable(f"{self.describe()}: {LOGIN_REFUSED} {exc}" if refused
                                   else f"{self.describe()}: {exc}",
                                   denied=self.dialect.denied(exc)) from exc

    def execute(self, cursor, sql, params=()):
        cursor.execute(self.dialect.sql(sql), params)

    def ensure_schema(self):
        cursor = self._db.cursor()
        for statement in statements(self.schema or self.dialect.schema):
            cursor.execute(statement)
        if self.schema is None:
            self.dialect.migrate(cursor, self._say_once)
        self._db.commit()
        cursor.close()

    def ping(self):
        with self.transaction() as cursor:
            self.execute(cursor, S_PING)

    def check_login(self):
        """--check-config: the daemon's login tried, and each privilege of S_PRIVILEGE_TRIALS,
        changing nothing: ([errors], [notes]). A server out of reach now is a note: paging does
        not wait for the history, nor does the daemon's start."""
        try:
            db = self.dialect.connect(self.settings)
        except Exception as exc:
            refusal = self.dialect.refusal(exc, self.settings)
            if refusal:
                return [f"history {self.describe()}: {refusal}"], []
            return [], [f"history {self.describe()} cannot be reached now ({exc}): alerts "
                        f"will wait in the journal until it can"]
        lacking = []
        try:
            cursor = db.cursor()
            for privilege, statement in S_PRIVILEGE_TRIALS:
                try:
                    cursor.execute(statement)
                except Exception as exc:
                    if self.dialect.denied(exc):
                        lacking.append(privilege)
                    elif not self.dialect.trial_passed(exc):
                        return [], [f"history {self.describe()}: its privileges could not be "
                                    f"tried ({exc})"]
            db.rollback()
        finally:
            db.close()
        if lacking:
            return [f"history {self.describe()}: the user lacks {', '.join(lacking)}: grant what "
                    f"{GRANTS_DOC} lists"], []
        return [], []

    def close(self):
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None

    def firing(self, limit):
        """(alerts firing now, the newest `limit` of them as dicts), as the history has them."""
        with self.transaction() as cursor:
            self.execute(cursor, S_FIRING_COUNT)
            count = cursor.fetchone()[0]
            self.execute(cursor, S_FIRING, (limit,))
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        for row in rows:
            row["starts_at"] = as_db_time(row["starts_at"])
        return count, rows

    def recurrence(self, occurrences, window):
        """For each (receiver, fingerprint, starts_at): how many earlier occurrences started
        within `window` seconds before it, and (starts_at, ends_at) of the last earlier one
        that resolved, or None. Index probes on uq_alerts_occurrence."""
        found = []
        with self.transaction() as cursor:
            for receiver, fingerprint, starts_at in occurrences:
                since = db_time(from_db_time(starts_at) - timedelta(seconds=window))
                self.execute(cursor, S_EARLIER, (receiver, fingerprint, since, starts_at))
                earlier = cursor.fetchone()[0]
                self.execute(cursor, S_LAST_RESOLVED, (receiver, fingerprint, starts_at))
                row = cursor.fetchone()
                last = tuple(t if t is None or isinstance(t, str) else db_time(t) for t in row) \
                    if row else None
                found.append((earlier, last))
        return found

    def purge(self, cutoff, batch):
        """Delete one batch of history older than `cutoff` from each table; rows deleted."""
        with self.transaction() as cursor:
            self.execute(cursor, S_PURGE_ALERTS, (cutoff, cutoff, batch))
            deleted = cursor.rowcount
            self.execute(cursor, S_PURGE_NOTIFICATIONS, (cutoff, batch))
            deleted += cursor.rowcount
            for sql in (S_PURGE_INCIDENT_EVENTS, S_PURGE_INCIDENTS, S_PURGE_NOTES):
                self.execute(cursor, sql, (cutoff, batch))      # events before their incidents
                deleted += cursor.rowcount
            return deleted

    # what the recorder writes
    CONFLICT_RETRIES = 5

    def record(self, journal_id, events):
        """_record(), again after a deadlock with another instance's recorder (a few times,
        after a short random pause); then the history counts as unavailable for now."""
        for attempt in range(self.CONFLICT_RETRIES):
            try:
                return self._record(journal_id, events)
            except StoreConflict as exc:
                last = exc
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        raise StoreUnavailable(f"{self.describe()}: {last}")

    def _record(self, journal_id, events):
        """Apply journal events (id, kind, JSON text) in one transaction, exactly once (progress
        kept alongside); returns how many alerts were recorded. Rows are gathered and written with
        one statement per kind: the upserts and increments commute, so grouping them gives the same
        history as applying events one by one."""
        alerts, sends, notified, notes = [], [], [], []
        with self.transaction() as cursor:
            self.execute(cursor, S_PROGRESS_GET, (journal_id,))
            row = cursor.fetchone()
            done = row[0] if row else 0
            for event_id, kind, text in events:
                if event_id <= done:
                    continue
                body = json.loads(text)
                if kind == "webhook":
                    alerts += self._alert_rows(body)
                    if "incident" in body:      # in the order they came: opens and resolves
                        self._incident(cursor, body["receiver"], body["incident"],
                                       body["received_at"])
                else:
                    sends.append(self._send_row(body))
                    if body["errcode"] == 0:
                        robot = body["robot"]
                        notified += [(robot, robot, robot, *key) for key in body["alerts"]]
                        notes += [(body["sent_at"], key) for key in body.get("notes", ())]
            for sql, rows in ((self.dialect.upsert, alerts), (S_NOTIFICATION_ADD, sends),
                              (S_ALERT_NOTIFIED, notified), (S_NOTE_SENT, notes)):
                if rows:
                    cursor.executemany(self.dialect.sql(sql), rows)
            self.execute(cursor, S_PROGRESS_PUT, (journal_id, max(done, events[-1][0])))
        return len(alerts)

    def _incident(self, cursor, receiver, incident, at):
        """Open the group's incident on a firing notification (unless one is open, or the
        group was resolved since), resolve it when none of its alerts fires; log each change."""
        route, group = incident["route"], group_hash(incident["group_key"])
        started, ended = incident.get("started_at"), incident.get("ended_at")  # 0.7: neither
        if incident["firing"]:
            self.execute(cursor, self.dialect.open_incident, (
                route, receiver[:128], group, group, incident["group_key"],
                json.dumps(incident["group_labels"], ensure_ascii=False), incident["title"],
                incident["level"][:64], incident.get("rank"), at, LOOK_NOW, started,
                incident.get("source", ALERTMANAGER)[:16], route, group, at, started,
                db_time(from_db_time(at) - timedelta(seconds=LATE_COPY))))
            kind = "opened"
            if cursor.rowcount != 1:
                self._firing_again(cursor, route, group, incident, at)
                return
        else:
            self.execute(cursor, S_INCIDENT_RESOLVE, (at, ended, route, group, ended, ended))
            kind = "resolved"
        if cursor.rowcount != 1:
            return
        if kind == "opened":
            self.execute(cursor, S_INCIDENT_OPEN_ID, (route, group))
            number = cursor.fetchone()[0]
        else:       # resolved: open_group is gone, the newest resolved one of the group
            self.execute(cursor, S_INCIDENT_RESOLVED_ID, (route, group, at))
            number = cursor.fetchone()[0]
        self.execute(cursor, S_INCIDENT_EVENT_ADD, (number, at, kind, "", "alertmanager", ""))

    def _firing_again(self, cursor, route, group, incident, at):
        """A firing notification of an incident open already: its alerts' latest start, and
        its level if higher (a warning turned critical; the chain starts again at it)."""
        started, rank = incident.get("started_at"), incident.get("rank")
        if started:
            self.execute(cursor, S_INCIDENT_FIRING, (started, route, group, started))
        if rank is None:
            return
        self.execute(cursor, S_INCIDENT_LEVEL, (incident["level"][:64], rank, at, LOOK_NOW,
                                                route, group, rank))
        if cursor.rowcount == 1:
            self.execute(cursor, S_INCIDENT_OPEN_ID, (route, group))
            self.execute(cursor, S_INCIDENT_EVENT_ADD, (cursor.fetchone()[0], at, "raised", "",
                                                        "alertmanager", incident["level"][:64]))

    def claim(self, route, group, person, at, via="link"):
        """`person` takes the open incident of a route's group, once: the first claim
        acknowledges it (and is logged), a later one changes nothing. Returns the incident
        (id, state, opened_at, acknowledged_at, acknowledged_by, claimed: whether this claim
        took it), or None when the group has no open incident (resolved, or not recorded yet)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_ACKNOWLEDGE, (at, person[:128], route, group))
            claimed = cursor.rowcount == 1
            self.execute(cursor, S_INCIDENT_OPEN_ROW, (route, group))
            row = cursor.fetchone()
            if row is None:
                return None
            if claimed:
                self.execute(cursor, S_INCIDENT_EVENT_ADD, (row[0], at, "acknowledged",
                                                            person[:128], via, ""))
        return {**self._incident_row(row), "claimed": claimed}

    def due_incidents(self, now, limit):
        """Open incidents whose next step is due by `now` (the escalator's clock, as text), or
        that it has not looked at yet, silenced ones included (their silence may be over), as
        dicts (times as text)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENTS_DUE, (now, limit))
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        return [{k: as_db_time(v) for k, v in row.items()} for row in rows]

    def take_silence(self, incident_id, marker, until, look_at, now):
        """Take the open incident for a silence about to be made (`marker`, a TAKING id, until
        `until`): True if this call took it, False if it is silenced, or being, already."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_SILENCE_TAKE, (marker, until, look_at, incident_id,
                                                           now))
            return cursor.rowcount == 1

    def silenced(self, incident_id, marker, silence_id, until, look_at, person, at, hours,
                 via="link"):
        """The silence Alertmanager made for an incident taken with `marker`: it escalates no
        more until `until`; the escalator looks at it again at `look_at`. False, and nothing
        kept, if the incident was resolved meanwhile."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_SILENCE, (silence_id, until, look_at, incident_id,
                                                      marker))
            if cursor.rowcount != 1:
                return False
            self.execute(cursor, S_INCIDENT_EVENT_ADD, (incident_id, at, "silenced",
                                                        person[:128], via,
                                                        f"{hours:g} h, silence {silence_id}"))
        return True

    def drop_silence(self, incident_id, marker):
        """Alertmanager did not make the silence: the incident is as it was (looked at now)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_SILENCE_DROP, (LOOK_NOW, incident_id, marker))

    def unsilence(self, incident_id, silence_id, steps_from, at, detail):
        """A silence that is over: the incident escalates again, its chain from `steps_from`
        (the escalator's clock). True if this call ended it (its event logged)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_UNSILENCE, (steps_from, LOOK_NOW, incident_id,
                                                        silence_id))
            if cursor.rowcount != 1:
                return False
            self.execute(cursor, S_INCIDENT_EVENT_ADD, (incident_id, at, "unsilenced", "",
                                                        "alertmanager", detail[:1024]))
        return True

    def silenced_incidents(self, limit):
        """Open incidents with a silence, or one being made (silenced_until as an epoch)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENTS_SILENCED, (limit,))
            rows = cursor.fetchall()
        return [{"id": i, "route": r, "receiver": rc, "group_hash": g,
                 "group_labels": json.loads(labels), "silence_id": s,
                 "silenced_until": from_db_time(as_db_time(until) or LOOK_NOW).timestamp()}
                for i, r, rc, g, labels, s, until in rows]

    def resolve_silenced(self, incident_id, at, detail):
        """Resolve a silenced incident whose alerts are gone; True if this call did."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_CLOSE, (at, incident_id))
            if cursor.rowcount != 1:
                return False
            self.execute(cursor, S_INCIDENT_EVENT_ADD, (incident_id, at, "resolved", "",
                                                        "alertmanager-api", detail[:1024]))
        return True

    def open_by_state(self):
        """{state: incidents} of the open ones (open, acknowledged)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENTS_OPEN_BY_STATE)
            return {state: count for state, count in cursor.fetchall()}

    def schedule(self, incidents):
        """When to look at incidents next: (id, steps done, next_step_at, steps_from) each,
        unless another instance escalated one meanwhile."""
        with self.transaction() as cursor:
            for incident_id, done, next_at, steps_from in incidents:
                self.execute(cursor, S_INCIDENT_SCHEDULE, (next_at, steps_from, incident_id,
                                                           done))

    def reschedule(self):
        """Every open incident looked at again (the escalations of the config changed)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENTS_RESCHEDULE, (LOOK_NOW,))

    def shift_steps(self, seconds):
        """Move the escalation times of the open incidents not silenced by `seconds` (the
        escalating instance's wall clock stepped by as much); how many were moved."""
        def moved(text):
            return text and db_time(from_db_time(text) + timedelta(seconds=seconds))
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENTS_TO_SHIFT, (LOOK_NOW, NEVER))
            rows = [tuple(map(as_db_time, row)) for row in cursor.fetchall()]
            cursor.executemany(self.dialect.sql(S_INCIDENT_SHIFT), [
                (moved(at), moved(since), incident_id, at) for incident_id, at, since in rows])
        return len(rows)

    def silence_until(self, incident_id, silence_id, until, look_at):
        """The silence's end as Alertmanager has it now (extended, or shortened in its UI)."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_SILENCE_UNTIL, (until, look_at, incident_id,
                                                            silence_id))

    def escalate(self, steps, at):
        """Mark steps done, each with its notes, in one transaction: (incident id, steps done,
        steps done now, next_step_at, steps_from, detail, [Note.row(), ...]) each. A step another
        instance took first (or a claim, resolve or silence since) changes nothing. Returns the
        ids of the incidents whose step this call took: their notes wait in the history."""
        taken = []
        with self.transaction() as cursor:
            for incident_id, done, now_done, next_at, steps_from, detail, notes in steps:
                self.execute(cursor, S_INCIDENT_ESCALATE, (now_done, next_at, steps_from,
                                                           incident_id, done))
                if cursor.rowcount != 1:
                    continue
                self.execute(cursor, S_INCIDENT_EVENT_ADD, (incident_id, at, "escalated", "",
                                                            "escalation", detail[:1024]))
                self._add_notes(cursor, notes, at)
                taken.append(incident_id)
        return taken

    def add_notes(self, notes, at):
        """Notes for groups to hear (a claim, a silence), kept until sent."""
        with self.transaction() as cursor:
            self._add_notes(cursor, notes, at)

    def _add_notes(self, cursor, notes, at):
        """Notes as Note.row() gives them."""
        cursor.executemany(self.dialect.sql(self.dialect.add_note), [
            (key, incident_id, route[:128], kind, level[:64], fit_text(text),
             json.dumps([mobiles, user_ids]), at)
            for key, incident_id, route, kind, level, text, mobiles, user_ids, _ in notes])

    def unsent_notes(self, since, relay, held, limit):
        """The oldest notes made since `since`, not yet sent, not journaled by `relay` (a
        journal's id) and not of the (route, kind) pairs `held`, as Note.row() gives them."""
        statement = S_NOTES_UNSENT.format(held=" AND NOT (route = %s AND kind = %s)" * len(held))
        with self.transaction() as cursor:
            self.execute(cursor, statement, (since, relay, *itertools.chain(*held), limit))
            rows = cursor.fetchall()
        return [(key, incident_id, route, kind, level, text, *json.loads(mentions),
                 as_db_time(made))
                for key, incident_id, route, kind, level, text, mentions, made in rows]

    def notes_relayed(self, keys, relay):
        """These notes are in the journal of `relay` (its id): it does not read them again."""
        with self.transaction() as cursor:
            cursor.executemany(self.dialect.sql(S_NOTE_RELAYED), [(relay, k) for k in keys])

    def notes_sent(self, keys, at):
        """These notes were sent (by any instance): no instance relays them again."""
        with self.transaction() as cursor:
            cursor.executemany(self.dialect.sql(S_NOTE_SENT), [(at, key) for key in keys])

    def open_incident(self, route, group):
        """The open incident of a route's group, as claim() gives it (claimed: False), or None."""
        with self.transaction() as cursor:
            self.execute(cursor, S_INCIDENT_OPEN_ROW, (route, group))
            row = cursor.fetchone()
        return {**self._incident_row(row), "claimed": False} if row else None

    @staticmethod
    def _incident_row(row):
        names = ("id", "state", "opened_at", "acknowledged_at", "acknowledged_by", "title",
                 "level", "group_labels", "silence_id", "silenced_until", "source")
        found = {k: as_db_time(v) for k, v in zip(names, row)}
        found["group_labels"] = json.loads(found["group_labels"] or "{}")
        return found

    def incidents(self, limit=100):
        """The newest incidents, each a dict with its events, newest first."""
        return self._incidents(S_INCIDENTS, (limit,))

    def open_incidents(self, limit, route=None):
        """The newest incidents not resolved (of one route, if named), as incidents() gives
        them but without their events."""
        if route is None:
            return self._incidents(S_INCIDENTS_STILL_OPEN, (limit,), events=False)
        return self._incidents(S_INCIDENTS_STILL_OPEN_OF, (route, limit), events=False)

    def incident(self, number):
        """One incident by its number, as incidents() gives it, or None."""
        found = self._incidents(S_INCIDENT, (number,))
        return found[0] if found else None

    def _incidents(self, sql, args, events=True):
        with self.transaction() as cursor:
            self.execute(cursor, sql, args)
            names = [column[0] for column in cursor.description]
            found = [dict(zip(names, row)) for row in cursor.fetchall()]
            for incident in found if events else ():
                self.execute(cursor, S_INCIDENT_EVENTS, (incident["id"],))
                incident["events"] = [row[0] for row in cursor.fetchall()]
        for incident in found:
            for key in ("opened_at", "acknowledged_at", "resolved_at", "next_step_at",
                        "silenced_until"):
                incident[key] = as_db_time(incident[key])
        return found

    @staticmethod
    def _alert_rows(event):
        received = event["received_at"]
        rows = []
        for a in event["alerts"]:
            labels, annotations = a["labels"], a["annotations"]
            rows.append((a["receiver"], a["fingerprint"], a["starts_at"], a["ends_at"], a["status"],
                         labels.get("alertname", "")[:255], labels.get("instance", "")[:255],
                         labels.get("severity", "")[:64], labels.get("job", "")[:255],
                         fit_text(annotations.get("summary")),
                         fit_text(annotations.get("description")),
                         json.dumps(labels, ensure_ascii=False),
                         json.dumps(annotations, ensure_ascii=False),
                         fit_text(a["generator_url"]), received, received))
        return rows

    @staticmethod
    def _send_row(event):
        route = event.get("route", event.get("receiver"))     # 0.3 journaled "receiver"
        fingerprints = fit_text(",".join(a[1] for a in event["alerts"]))
        return (event["sent_at"], route, event["robot"], event["request_id"][:255],
                event["message_id"], len(event["alerts"]), fingerprints, event["errcode"],
                event["errmsg"][:512], event["latency_ms"])


# The store process imports this file as a module, from its compiled form when Python could
# cache one (__pycache__): compiling 6,000 lines again would cost it about 5 MiB for good.
STORE_PROCESS_MAIN = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("alertbridge", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[2:]))"""


class StoreProcess:
    """The Store, run in a child process (`alertbridge.py --store-process FD`), same interface.
    Recording is the daemon's heaviest CPU work (pymysql escapes every value in Python): in a
    thread it holds the GIL the webhook handlers need, and stretches their acks. The child is
    started on first use (the daemon's at start, as a fork: fork_now) and again if it dies; it
    exits when closed or when the daemon is gone."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()   # one call at a time on the pipe
        self._child = self._pipe = None
        self._closed = False

    def describe(self):
        return self.settings.describe()

    # The Store's methods it answers, each with the longest a caller waits for the pipe (-1: as
    # long as it takes, the recorder's own). Past it: StoreUnavailable, busy. A page must not
    # hang on a slow database (the status page's reads wait 2 s, a sender's {history} 0.5 s);
    # the on-call loop's statements wait 5 s.
    WAITS = {"record": -1, "ping": -1, "purge": -1, "firing": 2.0, "recurrence": 0.5,
             "incidents": 2.0, "open_incidents": 2.0, "incident": 2.0,
             **dict.fromkeys(("claim", "open_incident", "due_incidents", "schedule",
                              "reschedule", "open_by_state", "shift_steps", "silence_until",
                              "take_silence", "silenced", "drop_silence", "unsilence",
                              "silenced_incidents", "resolve_silenced", "escalate", "add_notes",
                              "unsent_notes", "notes_relayed", "notes_sent"), 5.0)}

    def __getattr__(self, method):
        """store.claim(...) and the rest of WAITS: the call, made in the child."""
        if method not in self.WAITS:
            raise AttributeError(f"{type(self).__name__} has no {method}")
        return functools.partial(self._call, method, wait=self.WAITS[method])

    def _call(self, method, *args, wait=-1):
        if not self._lock.acquire(timeout=wait):
            raise StoreUnavailable(f"{self.describe()}: busy")
        try:
            outcome, value = self._exchange(method, args)
        finally:
            self._lock.release()
        if outcome in ("unavailable", "denied"):
            raise StoreUnavailable(value, denied=outcome == "denied")
        if outcome == "failed":
            raise StoreError(value)
        return value

    def _exchange(self, method, args):
        if self._closed:
            raise StoreUnavailable(f"{self.describe()}: closed")
        try:
            if self._child is None:
                self._start()
            self._pipe.send((method, args))
            return self._pipe.recv()
        except (OSError, EOFError) as exc:
            self._end()
            raise StoreUnavailable(f"{self.describe()}: store process lost ({exc!r})") from exc

    def fork_now(self):
        """Start the child now as a fork of this process, if it has only one thread (a fork of
        a threaded process may inherit a lock some other thread held): it shares this
        process's pages (the file, the stdlib, pymysql) instead of importing them again, about
        13 MiB less at idle (bench/memory.py). A child started later is a new process."""
        with self._lock:
            if self._child is None and not self._closed and threading.active_count() == 1:
                self._start(fork=True)

    def _start(self, fork=False):
        ours, theirs = socket.socketpair()
        try:
            self._child = ForkedStore(theirs.fileno()) if fork else subprocess.Popen(
                [sys.executable, "-c", STORE_PROCESS_MAIN, os.path.abspath(__file__),
                 "--store-process", str(theirs.fileno()), "--log-format", current_log_format()],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._pipe = multiprocessing.connection.Connection(ours.detach())
        self._pipe.send(asdict(self.settings))

    def _end(self, grace=5.0):
        if self._pipe is not None:
            self._pipe.close()      # the child reads end-of-file and exits
        if self._child is not None:
            try:
                self._child.wait(grace)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        self._child = self._pipe = None

    def close(self, timeout=5.0):
        """End the child within about `timeout` seconds. A call still running then (MySQL waiting
        on a lock, say) is cut short by killing the child: its transaction is not committed,
        and the journal keeps the events for the next start."""
        deadline = time.monotonic() + timeout
        self._closed = True
        if not self._lock.acquire(timeout=timeout):
            child = self._child
            if child is not None:
                with contextlib.suppress(OSError):
                    child.kill()        # the call in progress reads end-of-file and gives up
            self._lock.acquire()
        try:
            self._end(max(0.1, deadline - time.monotonic()))
        finally:
            self._lock.release()


class ForkedStore:
    """The store process as a fork of the daemon (StoreProcess.fork_now), with the part of
    subprocess.Popen's interface StoreProcess uses. The child keeps only the pipe `fd` and
    stdio open (the daemon's listening socket and journal stay the daemon's), and exits
    without running the daemon's exit handlers. (gc.freeze() before the fork saved nothing
    measurable here: bench/memory.py, 66.0 MiB with it, 66.2 without.)"""

    def __init__(self, fd):
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                for inherited in map(int, os.listdir("/proc/self/fd")):
                    if inherited > 2 and inherited != fd:
                        with contextlib.suppress(OSError):
                            os.close(inherited)
                code = serve_store(fd)
            finally:
                os._exit(code)
        self._ended = False

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        while not self._ended:
            self._ended = os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
            if not self._ended and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("store process", timeout)
            time.sleep(0 if self._ended else 0.01)

    def kill(self):
        if not self._ended:
            os.kill(self.pid, signal.SIGKILL)


def serve_store(fd):
    """The store process: answer Store calls from the daemon until it closes the pipe. Signals
    are the daemon's to handle (systemd sends SIGTERM to the whole unit): it closes us last."""
    for signum in DAEMON_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)  # blocked by the daemon we came from
    pipe = multiprocessing.connection.Connection(fd)
    store = None
    try:
        store = Store(Database(**pipe.recv()))
        while True:
            method, args = pipe.recv()
            try:
                reply = ("ok", getattr(store, method)(*args))
            except StoreUnavailable as exc:
                reply = ("denied" if exc.denied else "unavailable", str(exc))
            except Exception as exc:
                reply = ("failed", f"{type(exc).__name__}: {exc}")
            pipe.send(reply)
    except (EOFError, OSError):
        return 0
    finally:
        if store is not None:
            store.close()


# =============================================================================================
# 6. Packing: how messages become digests and parts (pure: sizes in, lengths out)
# =============================================================================================

def chunk_lengths(sizes, room):
    """Greedy packing of items in order: the lengths of consecutive runs whose sizes add up to
    at most `room`; an item larger than `room` is a run of its own (the renderer cuts it with a
    visible mark). Lazy, so a digest reads only the messages it takes, and one more."""
    count = used = 0
    for size in sizes:
        if count and used + size > room:
            yield count
            count = used = 0
        count += 1
        used += size
    if count:
        yield count


def cut(items, lengths):
    """`items` in consecutive pieces of the given lengths."""
    pieces, start = [], 0
    for length in lengths:
        pieces.append(items[start:start + length])
        start += length
    return pieces


def longest_that_fits(items, fits):
    """The longest prefix of `items` (at least one) for which fits(prefix) holds: the size
    estimates of chunk_lengths are checked against the real rendering, one item less at a time."""
    count = len(items)
    while count > 1 and not fits(items[:count]):
        count -= 1
    return items[:count]


def split_in_two(items):
    half = len(items) // 2
    return [items[:half], items[half:]]


# =============================================================================================
# 7. Rendering: a Body -> a Rendered message, any channel's input
# =============================================================================================

STANDARD_LABELS = ("alertname", "severity", "instance", "job")


def format_duration(seconds):
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" if n else "" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"))]
    return "".join(parts) + (f"{secs}s" if secs or not any(parts) else "")


def rebase_url(url, base):
    """`url` with its scheme and host replaced by `base` (whose path goes before url's): links
    to http://prometheus-0:9090 that work from a phone."""
    if not (url and base):
        return url
    parts = urllib.parse.urlsplit(url)
    return base + urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))


def external_url(alert, route=None):
    """Alertmanager's address for links: the route's alertmanager_url, else the webhook's."""
    return route.alertmanager_url if route and route.alertmanager_url else alert["external_url"]


def matchers(labels):
    """Label matchers as Alertmanager parses them (`{a="b", ...}`): in a value, a backslash, a
    quote and a line break are escaped, as its parser unescapes them."""
    escaped = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for k, v in labels.items()}
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(escaped.items())) + "}"


def silence_url(base, labels):
    """Alertmanager's form for a new silence, its matchers filled in from `labels`."""
    if not base or not labels:
        return ""
    return f"{base.rstrip('/')}/#/silences/new?filter=" + urllib.parse.quote(matchers(labels))


def web_url(text):
    """A URL from an alert (an annotation, generatorURL, externalURL) that a link or button
    may open: http(s) only, and encoded so that it stays one markdown link (a `)`, a space or
    a bracket in it is percent-encoded, never the end of the link). "" for anything else."""
    text = (text or "").strip()
    if not re.match(r"https?://[^\s/?#]", text, re.I) or _CONTROL_CHARACTERS.search(text):
        return ""
    return urllib.parse.quote(text, safe="!#$%&'*+,/:;=?@~-._")


def zone_name(moment):
    """'UTC+8', 'UTC-3:30', 'UTC' for an aware datetime: what a reader in any zone can read."""
    offset = int(moment.utcoffset().total_seconds() // 60)
    if not offset:
        return "UTC"
    hours, minutes = divmod(abs(offset), 60)
    return f"UTC{'-' if offset < 0 else '+'}{hours}" + (f":{minutes:02d}" if minutes else "")


LINK_FIELDS = frozenset({"links", "generator_url", "silence_url", "external_url", "runbook_url",
                         "dashboard_url", "other_labels"})


def alert_fields(alert, tz, route=None, history="", names=None, silence=True):
    """Everything an alert template can name: {alertname}, {labels[team]}, {duration}...
    Label and annotation values are Untrusted: escaped where they land, unless `:raw`.
    `names`: the fields a template uses (template_fields), if it names none of LINK_FIELDS
    those are left out: a storm's compact lines render twice as fast without them.
    `silence`: False when the page has alertbridge's own Silence link (no second one)."""
    labels = Blank({k: Untrusted(v) for k, v in alert["labels"].items()})
    annotations = Blank({k: Untrusted(v) for k, v in alert["annotations"].items()})
    resolved = alert["status"] == "resolved"
    level = (route or DEFAULT_ROUTE).level(alert)[1]
    level = "" if level == NO_LEVEL else level
    fields = Blank(
        labels=labels, annotations=annotations,
        **{k: labels[k] for k in STANDARD_LABELS},
        status=alert["status"].upper(),
        status_icon="✅" if resolved else "🔥",
        level=level, level_status=" · ".join(filter(None, [level, alert["status"].upper()])),
        **time_fields(alert["starts_at"], alert["ends_at"] if resolved else "", tz),
        summary=annotations["summary"], description=annotations["description"],
        fingerprint=alert["fingerprint"], receiver=alert["receiver"],
        history="" if resolved else history,
        values=Untrusted(alert.get("grafana", {}).get("values", "")),
    )
    if names is None or names & LINK_FIELDS:
        add_link_fields(fields, alert, route, resolved or not silence)
    return fields


@functools.lru_cache(maxsize=4096)
def time_fields(starts_at, ends_at, tz):
    """An alert's times as templates show them, in `tz` (`ends_at` "" while it fires). A
    storm's alerts share a few start times: each is formatted once."""
    starts, ends = from_db_time(starts_at), from_db_time(ends_at)
    local = starts.astimezone(tz)
    return {"starts_at": local.strftime("%Y-%m-%d %H:%M:%S"),
            "starts_short": local.strftime("%m-%d %H:%M"), "zone": zone_name(local),
            "ends_at": ends.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if ends else "",
            "duration": format_duration((ends - starts).total_seconds()) if ends else ""}


def source_name(alert):
    """What made the alert, as its generator link is labelled."""
    return "Grafana" if "grafana" in alert else "Prometheus"


def alert_silence_url(alert, labels, route):
    """Where to silence `labels` of the alert: Alertmanager's form; for a Grafana alert, the
    silence Grafana gave it."""
    if "grafana" in alert:
        return web_url(alert["grafana"]["silence_url"])
    return silence_url(web_url(external_url(alert, route)), labels)


def add_link_fields(fields, alert, route, unsilenced):
    """An alert's LINK_FIELDS: where to look, silence (unless `unsilenced`: resolved, or the
    page has alertbridge's own Silence link), read the runbook, see the dashboard (a Grafana
    alert's panel, else its dashboard, else the route's dashboard_url)."""
    grafana = alert.get("grafana", {})
    external = web_url(external_url(alert, route))
    prometheus = route.prometheus_url if route and not grafana else ""
    generator = web_url(rebase_url(alert["generator_url"], prometheus))
    fields.update(
        other_labels=Untrusted(", ".join(f"{k}={v}" for k, v in sorted(alert["labels"].items())
                                         if k not in STANDARD_LABELS)),
        generator_url=generator, external_url=external,
        dashboard_url=web_url(grafana.get("panel_url") or grafana.get("dashboard_url")),
        silence_url="" if unsilenced else alert_silence_url(alert, alert["labels"], route),
        runbook_url=web_url(alert["annotations"].get("runbook_url")))
    if route and route.dashboard_url and not fields["dashboard_url"]:
        fields["dashboard_url"] = web_url(render_template(route.dashboard_url, fields, "url"))
    words = WORDS[route.language if route else Templates.language]
    links = [(source_name(alert), generator), (words["silence"], fields["silence_url"]),
             (words["runbook"], fields["runbook_url"]),
             (words["dashboard"], fields["dashboard_url"]),
             (words["image"], web_url(grafana.get("image_url")))]
    fields["links"] = " · ".join(f"[{label}]({url})" for label, url in links if url)


def common_labels(alerts):
    """The labels every one of `alerts` has, with the same value."""
    if not alerts:
        return {}
    first, *rest = (a["labels"] for a in alerts)
    return {k: v for k, v in first.items() if all(other.get(k) == v for other in rest)}


def title_fields(alerts, part=None, group_labels=None, route=None, total=None):
    """What a title can name. `total`: (firing, resolved) of the whole message, for a part of
    it: the counts in the title are the message's, not the part's."""
    firing = sum(a["status"] == "firing" for a in alerts)
    resolved = len(alerts) - firing
    if total:
        firing, resolved = total
    state = " ".join(f"{word}:{n}" for word, n in (("FIRING", firing), ("RESOLVED", resolved)) if n)
    ranks = [(route or DEFAULT_ROUTE).level(a) for a in alerts]
    level = min(ranks)[1] if ranks else NO_LEVEL
    level = "" if level == NO_LEVEL else level
    names = list(dict.fromkeys(a["labels"].get("alertname", "") for a in alerts))
    receivers = ", ".join(dict.fromkeys(a["receiver"] for a in alerts))  # Alertmanager's receivers
    more = f" +{len(names) - 5}" if len(names) > 5 else ""
    alertnames = Untrusted(", ".join(names[:5]) + more)
    grouped = " ".join(v for _, v in sorted((group_labels or {}).items()))
    return Blank(state=state, firing=firing, resolved=resolved, count=firing + resolved,
                 level=level, tag=" · ".join(filter(None, [level.upper(), state])),
                 receiver=receivers, alertnames=alertnames,
                 group_labels=Untrusted(grouped) if grouped else alertnames,
                 common_labels=Blank({k: Untrusted(v) for k, v in common_labels(alerts).items()}),
                 external_url=next((web_url(external_url(a, route)) for a in alerts), ""),
                 part=f"({part[0]}/{part[1]})" if part else "")


TRUNCATED_MARK = "\n\n…(truncated: alert too long for one DingTalk message)"


def json_size(text):
    """Bytes `text` takes inside a JSON body as sent (UTF-8, escapes included)."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def truncate_to(text, limit):
    """Cut `text` so that it plus the truncation mark fits `limit` JSON bytes."""
    if json_size(text) <= limit:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if json_size(text[:mid] + TRUNCATED_MARK) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + TRUNCATED_MARK


def ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def recurrence_text(earlier, last, tz, language):
    """The {history} field in `language`: '24 小时内第 3 次；上次 11-27 13:02 恢复，持续 6m' (zh),
    '3rd time in 24 h; last resolved 11-27 13:02 after 6m' (en), or the part of it the history
    knows; '' if nothing."""
    words, parts = WORDS[language], []
    if earlier:
        parts.append(words["nth"].format(n=earlier + 1, ordinal=ordinal(earlier + 1)))
    if last and last[1]:
        starts, ends = from_db_time(last[0]), from_db_time(last[1])
        when = ends.astimezone(tz).strftime("%m-%d %H:%M")
        lasted = format_duration((ends - starts).total_seconds())
        parts.append(words["last_resolved"].format(when=when, lasted=lasted))
    return words["and"].join(parts)


def _occurrence(alert):
    return (alert["receiver"], alert["fingerprint"], alert["starts_at"])


class Recurrence:
    """How often an alert happened before, from the history, for the {history} field. A
    sender asks for a message's alerts before rendering it (prefetch) and waits WAIT seconds at
    most: the lookup runs in a thread of its own, one at a time, so a slow or down store leaves
    the field empty and the page goes out; an answer that comes late is kept for later
    messages. The lookup itself waits PATIENCE seconds for the store if it is busy (starting,
    or recording): a moment's contention is not a failure. After a failed lookup, none for
    BACKOFF seconds."""

    WAIT = 0.5
    PATIENCE = 5.0
    WINDOW = 86400.0
    BATCH = 20
    KEPT = 10_000
    BACKOFF = 30.0

    def __init__(self, store):
        self.store = store
        self._known = collections.OrderedDict()     # occurrence -> (earlier, last)
        self._lock = threading.Lock()               # _known, _running, _quiet_until
        self._running = None                        # the lookup under way: an Event set when done
        self._quiet_until = 0.0

    def __call__(self, alert):
        """(earlier occurrences in WINDOW, the last one resolved), or None: not known yet."""
        with self._lock:
            return self._known.get(_occurrence(alert))

    def prefetch(self, alerts, wait=WAIT):
        with self._lock:
            wanted = [o for o in dict.fromkeys(_occurrence(a) for a in alerts
                                               if a["status"] == "firing")
                      if o not in self._known][:self.BATCH]
            if (not wanted or time.monotonic() < self._quiet_until
                    or (self._running and not self._running.is_set())):
                return
            self._running = done = threading.Event()
        threading.Thread(target=self._lookup, args=(wanted, done), name="history",
                         daemon=True).start()
        done.wait(wait)

    def _lookup(self, occurrences, done):
        try:
            found = self.store.recurrence(occurrences, self.WINDOW, wait=self.PATIENCE)
        except (StoreUnavailable, StoreError) as exc:
            log.info("history for {history} not read (%s): the field stays empty for %gs", exc,
                     self.BACKOFF)
            with self._lock:
                self._quiet_until = time.monotonic() + self.BACKOFF
            return
        finally:
            done.set()
        with self._lock:
            for occurrence, (earlier, last) in zip(occurrences, found):
                self._known[occurrence] = (earlier, last)
            while len(self._known) > self.KEPT:
                self._known.popitem(last=False)


def _mention_words(value):
    return [w for w in re.split(r"[\s,;，；、]+", value[:4096]) if w]


@dataclass(frozen=True)
class GroupFields:
    """What an alert block can say of its message: {group_labels}, {common_labels[NAME]}."""
    key: tuple
    fields: dict


def group_fields(title):
    """The message-level fields of title_fields() that alert blocks may use too."""
    common = title["common_labels"]
    return GroupFields((str(title["group_labels"]), tuple(sorted(common.items()))),
                       {"group_labels": title["group_labels"], "common_labels": common})


@functools.lru_cache(maxsize=64)
def template_fields(template):
    """The top-level field names a template uses: {labels[team]} is 'labels'."""
    return frozenset((field_name(field) or ("",))[0]
                     for line in _parsed(template) for _, field, _, _ in line if field is not None)


def uses_field(template, name):
    return name in template_fields(template)


def digest_title(level, title, language):
    """A digest's title: its level first, so a backlog reads at a glance in the chat list."""
    return f"{level.upper()} {WORDS[language]['digest']} · {title}"


@dataclass(frozen=True)
class Rendered:
    """A message as any channel can send it, the renderer's output and a channel's input:
    markdown (DingTalk's dialect) in blocks, and apart from it who to mention and which
    buttons, for the channel to place as its wire format wants."""
    title: str          # plain text, as a chat list shows it
    heading: str        # the title, as markdown
    blocks: tuple       # one per alert, or per alertname in a digest
    notes: tuple        # lines after the blocks (Alertmanager's truncation)
    buttons: tuple      # (label, url) pairs
    mentions: Mentions
    rank: int = None    # the highest priority among its firing alerts, 0 highest (a card's
    #                     colour); None when none fires


class Renderer:
    """Turns a message Body into a Rendered message (templates, escaping, links, mentions,
    buttons, {history}), and plans how a body goes out through a channel: parts, and the @
    message of a card. `config()` gives the running Config; `history` (optional) a firing
    alert's {history} text (see Recurrence).

    Sender threads share one Renderer and its caches of alert blocks and messages (Recent)."""

    SEPARATOR = "\n\n---\n\n"
    BLOCKS_KEPT = 8192      # a storm's backlog: a digest of compact lines holds ~200 alerts
    RENDERED_KEPT = 16

    def __init__(self, config, history=None, wall=wall_time):
        self.config = config
        self.history = history
        self.wall = wall            # the time whoever is on call is mentioned at
        self._rendered = Recent(self.RENDERED_KEPT)     # (id(body), id(route)) ->
        #                                         (body, route, second, Rendered)
        self._blocks = Recent(self.BLOCKS_KEPT)  # (id(alert), id(route), group key, compact)
        #   -> (alert, route, block, size): both kept, so neither id is another's while here

    def alert_block(self, route, alert, group=None, compact=False):
        """The alert in the route's template (`compact`: its compact one); `group`: the
        message's group fields (group_fields)."""
        return self._kept_block(route, alert, group, compact)[0]

    def _kept_block(self, route, alert, group, compact):
        """(block, its size in a request): remembered by the alert's and the route's identity
        (both kept, so their ids cannot be reused; a reload makes new routes) and, only if the
        template shows them, the group fields.
        Sizing a digest, checking it fits each robot and sending it would otherwise render
        every alert five times, on the thread the webhooks share the GIL with; the oldest
        blocks are forgotten first."""
        template = route.compact if compact else route.alert
        grouped = group is not None and (uses_field(template, "group_labels")
                                         or uses_field(template, "common_labels"))
        key = (id(alert), id(route), group.key if grouped else None, compact)
        kept = self._blocks.get(key)
        if kept is not None and kept[0] is alert and kept[1] is route:
            return kept[2:]
        fields = self.fields(route, alert, template)
        fields.update(group.fields if group else {})
        block = render_template(template, fields)
        size = json_size(block) + len(self.SEPARATOR) + 16
        self._blocks.put(key, (alert, route, block, size))
        return block, size

    def fields(self, route, alert, template=None):
        """The alert's fields (only those `template` may name, if given)."""
        tz, known = self.config().tz, None
        if (self.history is not None and alert["status"] == "firing"
                and uses_field(route.alert, "history")):
            known = self.history(alert)
        text = recurrence_text(*known, tz, route.language) if known else ""
        return alert_fields(alert, tz, route, text, template_fields(template) if template else None,
                            silence=not self.silences_itself(route, (alert,)))

    def silences_itself(self, route, alerts):
        """Whether the route's pages of `alerts` carry alertbridge's Silence link (claim_links,
        and [oncall] alertmanager_api to make silences with): Alertmanager's is then left out,
        so that a page has one. Not for Grafana's alerts: Alertmanager does not hold them, and
        Grafana's own silence link stays."""
        return (route.claim_links and bool(self.config().oncall.alertmanager_api)
                and not any("grafana" in alert for alert in alerts))

    def look_up_history(self, route, alerts, wait=Recurrence.WAIT):
        """Before rendering: have the alerts' {history} read, if the route's template shows it
        (waiting `wait` seconds at most, see Recurrence)."""
        if self.history is not None and uses_field(route.alert, "history"):
            self.history.prefetch(alerts, wait)

    @staticmethod
    def mentions(route, alerts, at=None, tz=timezone.utc):
        """Who to @: only for a message with a firing alert of a level at_severities lists (any,
        if it lists none): the route's own list and people (whoever is on call in a rotation at
        epoch `at`, now if None), the people its alerts' labels name (at most
        MENTIONS_FROM_ALERTS, phone numbers and user ids only), its at_map's entries."""
        levels = route.at_severities
        wanted = [a for a in alerts if a["status"] == "firing"
                  and (not levels or route.level(a)[1] in levels)]
        if not wanted:
            return Mentions()
        at = wall_time() if at is None else at
        mobiles, user_ids, named = list(route.at_mobiles), list(route.at_user_ids), []
        for found, more in zip((mobiles, user_ids), reached(route.at_people, at, tz)):
            found += more
        entries = {value: (m, u, p) for value, m, u, p in route.at_map}
        for alert in wanted:
            found = {**alert["annotations"], **alert["labels"]}
            named += [("m", w) for key in route.at_mobiles_from
                      for w in _mention_words(found.get(key, "")) if MOBILE.fullmatch(w)]
            named += [("u", w) for key in route.at_user_ids_from
                      for w in _mention_words(found.get(key, "")) if is_user_id(w)]
            m, u, p = entries.get(alert["labels"].get(route.at_map_label), ((), (), ()))
            on_duty = reached(p, at, tz)
            mobiles += list(m) + on_duty[0]
            user_ids += list(u) + on_duty[1]
        named = list(dict.fromkeys(named))[:MENTIONS_FROM_ALERTS]
        mobiles += [w for kind, w in named if kind == "m"]
        user_ids += [w for kind, w in named if kind == "u"]
        return Mentions(tuple(dict.fromkeys(mobiles)), tuple(dict.fromkeys(user_ids)),
                        route.at_all)

    def buttons(self, route, alerts):
        """A card's buttons, (label, url): a silence for what the alerts have in common (while
        any fires; from Grafana, its silence of the one alert firing), the first runbook, the
        first alert's Prometheus graph (or Grafana rule) and dashboard."""
        if not alerts:
            return ()
        firing = [a for a in alerts if a["status"] == "firing"]
        first = self.fields(route, alerts[0])
        runbooks = (web_url(a["annotations"].get("runbook_url")) for a in alerts)
        words = WORDS[route.language]
        own = self.silences_itself(route, alerts)
        grafana_group = "grafana" in alerts[0] and len(firing) != 1  # Grafana's: one alert's
        candidates = [
            (words["silence"], "" if own or grafana_group or not firing
             else alert_silence_url(firing[0], common_labels(firing), route)),
            (words["runbook"], next((url for url in runbooks if url), "")),
            (source_name(alerts[0]), first["generator_url"]),
            (words["dashboard"], first["dashboard_url"])]
        return tuple((label, web_url(url)) for label, url in candidates if web_url(url))

    def render(self, route, body):
        """A body of alerts (ALERTS or CARD) as a Rendered message. Remembered for the rest of
        the second by the body's and the route's identity: a digest is checked against each
        robot, planned and sent, and each of those would render it again."""
        key, second = (id(body), id(route)), int(self.wall())
        kept = self._rendered.get(key)
        if kept is not None and kept[0] is body and kept[1] is route and kept[2] == second:
            return kept[3]
        return self._rendered.put(key, (body, route, second, self._render(route, body)))[3]

    def _render(self, route, body):
        alerts = list(body.alerts)
        fields = title_fields(alerts, body.part, body.group_labels, route, body.total)
        titles = [render_template(route.title, fields, escape).strip()
                  for escape in (None, "markdown")]    # the chat list shows it as plain text
        if body.part:
            titles = [t + " ({}/{})".format(*body.part) for t in titles]
        if body.digest:
            titles = [digest_title(body.level, t, route.language) for t in titles]
        shared = group_fields(fields)
        full = self.full_blocks(route, body)
        if body.digest:
            groups, at = {}, 0
            for alert in alerts:
                groups.setdefault(alert["labels"].get("alertname", ""), []).append((at, alert))
                at += 1
            blocks = [f"##### {md_escape(name)} × {len(group)}\n\n" + self.SEPARATOR.join(
                          self.blocks(route, group, shared, full))
                      for name, group in groups.items()]
        else:
            blocks = self.blocks(route, enumerate(alerts), shared, full)
        claim = self.claim_url(route, body)
        words = WORDS[route.language]
        silence = self.claim_url(route, body, "silence") \
            if claim and self.silences_itself(route, alerts) else ""
        links = [f"[{words['claim']}]({claim})"] + (
            [f"[{words['silence_for']}]({silence})"] if silence else [])
        notes = (("👉 " + " · ".join(links),) if claim else ()) + (
            (f"(+{body.truncated} alerts truncated by Alertmanager max_alerts)",)
            if body.truncated else ())
        buttons = self.buttons(route, alerts) if route.message_type == "actionCard" else ()
        if claim and buttons:
            buttons = ((words["claim"], claim),) + buttons[:3]
        ranks = [route.level(a)[0] for a in alerts if a["status"] == "firing"]
        return Rendered(titles[0], titles[1], tuple(blocks), notes, buttons,
                        self.mentions(route, alerts, self.wall(), self.config().tz),
                        min(ranks, default=None))

    def blocks(self, route, placed, shared, full):
        """The blocks of (position, alert) pairs in order: an alert before position `full` as a
        block of its own, the compact lines after it as one block, a list."""
        blocks, lines = [], []
        for at, alert in placed:
            block = self.alert_block(route, alert, shared, compact=at >= full)
            (lines if at >= full else blocks).append(block)
        return blocks + (["\n".join(lines)] if lines else [])

    def claim_url(self, route, body, action="claim"):
        """The signed link of a firing page that claims (or silences) its incident, if the
        route puts links on."""
        if not (route.claim_links and body.group_key and not body.digest
                and any(a["status"] == "firing" for a in body.alerts)):
            return ""
        return claim_link(self.config().oncall, route.name, group_hash(body.group_key),
                          self.wall(), action)

    @staticmethod
    def full_blocks(route, body):
        """How many of a body's alerts are shown in full, the others compact: the first
        compact_after of a message (none after its first part; all if compact_after is 0)."""
        if not route.compact_after:
            return len(body.alerts)
        return 0 if body.part and body.part[0] > 1 else route.compact_after

    def plain_title(self, route, body):
        """The message's title without part or digest marks (what its @ message repeats)."""
        fields = title_fields(list(body.alerts), None, body.group_labels, route)
        return render_template(route.title, fields, None).strip()

    # how a body goes out
    def plan(self, route, body, channels, packed=False):
        """The bodies that go out, in order, for this one: itself; or its parts, if it does not
        fit every robot of the route (not tried again for a `packed` digest or part); or, for
        a card a channel of the route cannot @ beside buttons, the card and then its @ message
        (after a message's last part only). Each part is planned again when its turn comes."""
        if body.kind != ALERTS:
            return [body]
        parts = [body] if packed else self.parts(route, body, channels)
        if len(parts) > 1 or (body.part and body.part[0] != body.part[1]):
            return parts
        rendered = self.render(route, body)
        if not channels.mentions_apart(rendered, route):
            return [body]
        mention = Body(kind=MENTION, mention=rendered.mentions,
                       title=self.plain_title(route, body))
        return [replace(body, kind=CARD), mention]

    def expand(self, route, body, channels):
        """Every body that goes out for this one, parts planned in turn: the dry run's view."""
        planned = self.plan(route, body, channels)
        if planned == [body]:
            return planned
        return [done for each in planned for done in self.expand(route, each, channels)]

    def fits(self, route, body, channels):
        """Whether the body goes out whole to every robot of the route (keywords differ)."""
        return channels.fits(self.render(route, body), route)

    def room(self, route, channels, digest=False):
        """Bytes for alert blocks in one message: the rest is for title, part numbers, mentions,
        keyword and digest headings. A digest's may be bolder, a 16th of a narrow limit (WeCom's
        4,096 bytes) rather than 768 bytes: the digest is checked against its real rendering
        before it is made (longest_that_fits), where a part is not."""
        limit = channels.limit(route)
        return limit - (min(768, limit // 16) if digest else 768)

    def block_size(self, route, alert, compact=False):
        return self._kept_block(route, alert, None, compact)[1]

    def block_sizes(self, route, alerts, start=0):
        """The sizes of alerts' blocks where they stand in a message (from position `start`):
        in full for the first compact_after, compact after."""
        full = route.compact_after or len(alerts) + start
        return [self.block_size(route, a, compact=start + i >= full) for i, a in enumerate(alerts)]

    def parts(self, route, body, channels):
        """A body as it goes out: itself if it fits every robot of the route (or has one alert,
        which is cut instead), else parts of as many alerts as fit, numbered, each titled with
        the whole message's counts."""
        alerts = list(body.alerts)
        if len(alerts) < 2 or self.fits(route, body, channels):
            return [body]
        room = self.room(route, channels)
        chunks = cut(alerts, chunk_lengths(self.block_sizes(route, alerts), room))
        if len(chunks) == 1:  # the sizes were misjudged: halve
            chunks = split_in_two(alerts)
        return numbered(body, chunks)


def numbered(body, chunks):
    """The body cut into parts of these alerts, numbered (1/n), with the message's counts."""
    firing = sum(a["status"] == "firing" for chunk in chunks for a in chunk)
    total = body.total or (firing, sum(len(chunk) for chunk in chunks) - firing)
    return [replace(body, alerts=tuple(chunk), part=(i + 1, len(chunks)), total=total)
            for i, chunk in enumerate(chunks)]


def request_body(renderer, channels, route, body, robot):
    """The request one robot gets for a body, written by its channel: what every sender, the
    preview and the dry run send or show."""
    channel = channels.of(robot)
    if body.kind == MENTION:
        return channel.mention_request(body, robot)
    if body.kind == NOTE:
        return channel.note_request(body, robot)
    rendered = renderer.render(route, body)
    if body.kind == CARD:   # its mentions go in the message after it, whatever the channel
        rendered = replace(rendered, mentions=Mentions())
    return channel.request(rendered, robot)


def sample_webhook(now):
    """A webhook for the preview to start from: a firing critical page and a warning, as
    Alertmanager 0.25 sends them to receiver `default`."""
    starts = datetime.fromtimestamp(now - 754, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def alert(name, instance, severity, summary, **annotations):
        return {"status": "firing", "labels": {"alertname": name, "instance": instance,
                                               "job": "node", "severity": severity},
                "annotations": {"summary": summary, **annotations}, "startsAt": starts,
                "endsAt": FIRING_ENDS_AT, "fingerprint": hashlib.sha256(
                    f"{name}{instance}".encode()).hexdigest()[:16],
                "generatorURL": "http://prometheus:9090/graph?g0.expr=node_filesystem_avail"}
    return {"version": "4", "groupKey": '{}:{alertname="DiskFull"}', "truncatedAlerts": 0,
            "status": "firing", "receiver": "default", "groupLabels": {"alertname": "DiskFull"},
            "commonLabels": {"alertname": "DiskFull", "job": "node"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": [
                alert("DiskFull", "db-3:9100", "critical", "/data on db-3 is 95% full",
                      description="At this rate it is full in 40 minutes.",
                      runbook_url="https://wiki.example.com/runbooks/disk-full"),
                alert("DiskFull", "db-4:9100", "warning", "/data on db-4 is 85% full")]}


def sample_alert(receiver, now=None):
    """A firing alert for tests of a route: --send-test and template checks."""
    now = now or datetime.now(timezone.utc)
    return {"fingerprint": "alertbridge-test", "status": "firing", "starts_at": db_time(now),
            "ends_at": None, "labels": {"alertname": "AlertbridgeTest", "severity": "info",
                                        "instance": socket.gethostname()},
            "annotations": {"summary": f"Test message from alertbridge for receiver {receiver}"},
            "generator_url": "", "external_url": "", "receiver": receiver}


# =============================================================================================
# 8. Transport: one HTTP exchange with one deadline, the WebSocket client
# =============================================================================================
#
# What any channel, and any API alertbridge calls, sends its bytes over. exchange_json() is the
# one HTTP exchange: the whole of it within a Deadline, an error status an answer too, no
# answer one of NO_ANSWER. The WebSocket client (RFC 6455) carries the DingTalk app's Stream
# connection, its connect, TLS and handshake within one ConnectDeadline.

def retry_delay(attempts, base, longest, jitter=random.uniform):
    """Seconds to wait after `attempts` failed rounds: doubling from `base` up to `longest`, with
    jitter so that waiting messages do not all retry at once. Bounded for any `attempts`."""
    return min(longest, base * 2.0 ** min(attempts, 64)) * jitter(0.5, 1.0)


class Retry:
    """The retry state of one loop (every worker, every route's sender, the Stream client):
    its failures in a row, the wait before the next try (retry_delay), and what the log says:
    a failure when its text changes, not at every retry; once "working again" after."""

    def __init__(self, name):
        self.name = name
        self.failures = 0
        self.said = None            # the failure last logged, while failing

    def failed(self, text, level=logging.ERROR, exc=None, base=0.5, longest=30.0):
        """One more failure; its line logged if it is a new one. Seconds to wait."""
        self.tell(text, level, exc)
        return self.next_wait(base, longest)

    def next_wait(self, base=0.5, longest=30.0):
        """One more failure: seconds to wait."""
        self.failures += 1
        return retry_delay(self.failures - 1, base, longest)

    def tell(self, text, level=logging.WARNING, exc=None, same_as=None):
        """The failure's line, if it is not the one said last (compared as `same_as`, if the
        line holds what changes at each retry, a delay)."""
        key = text if same_as is None else same_as
        if key != self.said:
            log.log(level, "%s", text, exc_info=exc)
            self.said = key

    def worked(self):
        if self.failures:
            log.info("%s: working again", self.name)
        self.failures, self.said = 0, None


class Deadline:
    """Ends an HTTP exchange `seconds` after it began, however slowly the peer answers. Socket
    timeouts bound each read, not the whole exchange, so a timer shuts the socket down."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.passed = False
        self._sockets = []
        self._lock = threading.Lock()       # _sockets and passed: the timer's thread and ours
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()

    def watch(self, sock):
        with self._lock:
            self._sockets.append(sock)
            if self.passed:
                self._shut(sock)

    def _cut(self):
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock):
        # The plain socket call, under TLS too. Safe on a closed socket: its fd is then -1.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _DeadlineHandler:
    """urllib's HTTP(S) handler, handing each connection's socket to its request's Deadline."""

    def do_open(self, http_class, req, **options):
        def connection(host, **settings):
            conn = http_class(host, **settings)
            connect = conn.connect

            def connect_and_watch():   # after TLS, so the socket watched is the one read
                connect()
                req.deadline.watch(conn.sock)
            conn.connect = connect_and_watch
            return conn
        return super().do_open(connection, req, **options)


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def _no_answer(exc):
    if isinstance(exc, urllib.error.URLError):
        return f"network: {exc.reason}"
    return f"no answer: {type(exc).__name__}: {exc}"


NO_ANSWER = (OSError, ValueError, http.client.HTTPException)    # what exchange_json may raise


def exchange_json(method, url, body=None, headers=None, timeout=10.0, limit=4 << 20):
    """One HTTP request with a JSON body (if any), done within `timeout` seconds in all (see
    Deadline): (HTTP status, the answer's first `limit` bytes); an error status is an answer
    too. A request that gets no answer raises one of NO_ANSWER. It asks for JSON (Accept):
    DingTalk's gateway answers XML to a request that does not."""
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    request = urllib.request.Request(url, data, method=method, headers={
        "Content-Type": "application/json", "Accept": "application/json",
        "User-Agent": "alertbridge/" + VERSION, **(headers or {})})
    with Deadline(timeout) as request.deadline:
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return response.status, response.read(limit)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(limit)


class WebSocketClosed(Exception):
    """The WebSocket is closed (a close frame, or the socket ended), or could not be opened."""


class ConnectDeadline(Deadline):
    """The Deadline of a WebSocket being opened, which its owner may also cut at once
    (StreamClient.stop: a gateway trickling its handshake must not hold a shutdown)."""

    def cut(self):
        self._cut()


class WebSocket:
    """An RFC 6455 client over a plain or TLS socket: the handshake, masked frames of any size,
    fragmented messages, ping and pong, close. One thread reads (recv); sends take _send_lock,
    so the owner may ping while the reader answers a ping. `heard`: time.monotonic() of the
    last frame received, pongs included (how a half-open connection is noticed). What the
    server sends is bounded before it is worked on: a message's bytes (MAX_MESSAGE) and frames
    (MAX_FRAGMENTS: empty continuations cost work, not bytes), a control frame's 125 bytes."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    MAX_MESSAGE = 4 << 20
    MAX_FRAGMENTS = 4096
    MAX_CONTROL = 125           # RFC 6455 5.5: a control frame's payload, never fragmented
    MAX_HANDSHAKE = 16384       # the handshake's answer, headers included
    TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA

    def __init__(self, sock):
        self.sock = sock
        self.heard = time.monotonic()
        self._send_lock = threading.Lock()
        self._buffer = bytearray()      # received, not yet a whole frame (cut from the front)
        self._parts, self._size, self._opcode = [], 0, None    # a fragmented message so far
        self.closed = False

    @classmethod
    def connect(cls, url, timeout, context=None, deadline=None):
        """An open WebSocket to `url`, within `timeout` seconds in all: the TCP connection, TLS
        and the handshake together, however slowly the server answers (a Deadline shuts the
        socket down; each read has `timeout` too). `deadline`: a ConnectDeadline the caller
        may cut sooner; by default one of `timeout` seconds."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("not a ws:// or wss:// URL")
        secure = parts.scheme == "wss"
        deadline = deadline or ConnectDeadline(timeout)
        with deadline:
            sock = cls._dial(parts.hostname, parts.port or (443 if secure else 80), timeout,
                             deadline)
            try:
                if secure:
                    sock = cls._tls(sock, parts.hostname, context, deadline)
                ws = cls(sock)
                ws._handshake(parts)
            except BaseException as exc:
                sock.close()
                if deadline.passed and isinstance(exc, (OSError, WebSocketClosed)):
                    raise WebSocketClosed(f"no WebSocket within {timeout:g} s (connection, TLS "
                                          f"and handshake)") from exc
                raise
        if deadline.passed:     # the timer fired as the handshake ended: the socket is shut
            sock.close()
            raise WebSocketClosed(f"no WebSocket within {timeout:g} s")
        return ws

    @staticmethod
    def _dial(host, port, timeout, deadline):
        """A TCP connection to the first of the host's addresses that accepts, each socket
        watched by `deadline` and given what is left of `timeout`."""
        ends, error = time.monotonic() + timeout, OSError(f"{host}: no address")
        for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                                  type=socket.SOCK_STREAM):
            if deadline.passed or time.monotonic() >= ends:
                raise WebSocketClosed(f"no connection to {host} within {timeout:g} s")
            sock = socket.socket(family, kind, proto)
            deadline.watch(sock)
            try:
                sock.settimeout(max(ends - time.monotonic(), 0.001))
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.settimeout(timeout)
            return sock
        raise error

    @staticmethod
    def _tls(sock, hostname, context, deadline):
        """TLS over `sock`; its handshake runs once the TLS socket is watched (wrap_socket
        detaches `sock`: shutting that down would no longer reach the connection)."""
        tls = (context or ssl.create_default_context()).wrap_socket(
            sock, server_hostname=hostname, do_handshake_on_connect=False)
        deadline.watch(tls)
        try:
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def _handshake(self, parts):
        key = base64.b64encode(os.urandom(16)).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall((f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"User-Agent: alertbridge/{VERSION}\r\n\r\n").encode())
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > self.MAX_HANDSHAKE:
                raise WebSocketClosed("the handshake's answer is too long")
            self._fill()
        end = self._buffer.index(b"\r\n\r\n")
        head = bytes(self._buffer[:end])
        del self._buffer[:end + 4]
        status, *lines = head.decode("latin-1").split("\r\n")
        if status.split(" ")[1:2] != ["101"]:
            raise WebSocketClosed(f"the handshake was answered {status[:80]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise WebSocketClosed("the handshake's Sec-WebSocket-Accept is wrong")

    def send_text(self, text):
        self._send(self.TEXT, text.encode())

    def ping(self, payload=b""):
        self._send(self.PING, payload)

    def recv(self, timeout):
        """The next text message (str), answering pings and noting pongs on the way; raises
        socket.timeout if none came whole within `timeout` (what did stays buffered)."""
        self.sock.settimeout(timeout)
        while True:
            final, opcode, payload = self._frame()
            self.heard = time.monotonic()
            if opcode == self.PING:
                self._send(self.PONG, payload)
            elif opcode == self.CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close(code if 1000 <= code < 5000 and code not in (1005, 1006, 1015)
                           else 1000)      # codes that never go on the wire: a plain close
                raise WebSocketClosed(f"closed by the server ({code} "
                                      f"{payload[2:].decode(errors='replace')})")
            elif opcode != self.PONG:
                message = self._gather(final, opcode, payload)
                if message is not None:
                    return message

    def _gather(self, final, opcode, payload):
        """A data frame added to the message it belongs to: the message once whole, else None.
        Its size and frame count are kept as frames come (not summed again on each)."""
        if opcode in (self.TEXT, self.BINARY):
            if self._opcode:
                raise self._fail(1002, "a new message inside a fragmented one")
            self._opcode = opcode
        elif opcode != 0 or not self._opcode:
            raise self._fail(1002, f"an unexpected frame (opcode {opcode})")
        self._parts.append(payload)
        self._size += len(payload)
        if self._size > self.MAX_MESSAGE:
            raise self._fail(1009, "a message over 4 MiB")
        if len(self._parts) > self.MAX_FRAGMENTS:
            raise self._fail(1009, f"a message in over {self.MAX_FRAGMENTS} frames")
        if not final:
            return None
        data, opcode = b"".join(self._parts), self._opcode
        self._parts, self._size, self._opcode = [], 0, None
        try:
            return data.decode() if opcode == self.TEXT else data.decode("latin-1")
        except UnicodeDecodeError:
            raise self._fail(1007, "a text message that is not UTF-8")

    def close(self, code=1000):
        if not self.closed:
            self.closed = True
            try:
                self._send(self.CLOSE, code.to_bytes(2, "big"), force=True)
            except OSError:
                pass
        with contextlib.suppress(OSError):      # wakes a thread blocked reading it
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fail(self, code, why):
        self.close(code)
        return WebSocketClosed(why)

    def _frame(self):
        """(final, opcode, payload) of the next whole frame; nothing is consumed until it is.
        Its header is checked before its payload is waited for."""
        while True:
            data = self._buffer
            if len(data) >= 2:
                if data[0] & 0x70 or data[1] & 0x80:
                    raise self._fail(1002, "a frame with reserved bits set, or masked")
                final, opcode, length, at = bool(data[0] & 0x80), data[0] & 0x0F, data[1] & 0x7F, 2
                if opcode & 0x8 and (length > self.MAX_CONTROL or not final):
                    raise self._fail(1002, f"a control frame (opcode {opcode}) fragmented or "
                                           f"over {self.MAX_CONTROL} bytes")
                if length >= 126:
                    size = 2 if length == 126 else 8
                    if len(data) < 2 + size:
                        self._fill()
                        continue
                    length, at = int.from_bytes(data[2:2 + size], "big"), 2 + size
                if length > self.MAX_MESSAGE:
                    raise self._fail(1009, "a frame over 4 MiB")
                if len(data) >= at + length:
                    payload = bytes(data[at:at + length])
                    del data[:at + length]
                    return final, opcode, payload
            self._fill()

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            self.closed = True
            raise WebSocketClosed("the connection ended")
        self._buffer += chunk

    def _send(self, opcode, payload, force=False):
        if self.closed and not force:
            raise WebSocketClosed("closed")
        mask, n = os.urandom(4), len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 1 << 16:
            head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        with self._send_lock:
            self.sock.sendall(head + mask + masked)


# =============================================================================================
# 9. Channels: how a message reaches a group: DingTalk's, Feishu's and WeCom's robots, each
#    its wire format, signing, limits, one request, its answer classified once
# =============================================================================================
#
# A channel turns a Rendered message into the request one robot gets, posts it, and says what
# the answer means. Its methods: limit(), request(), mention_request(), mentions_apart(),
# fits(), encode(), shown() (for the preview), post(), outcome(), fix() (what to do about a
# refusal: the log, --send-test and the status page ask it); its RATE_LIMITS, the windows its
# platform counts a robot's messages in (the pool keeps to each). Another kind of robot is
# another Channel with these; nothing outside this section reads a request.

SENT, THROTTLED, MISCONFIGURED = "sent", "throttled", "misconfigured"
TOO_LONG, FAILED = "too long", "failed"


@dataclass
class SendResult:
    """A channel's answer to one request. errcode: the platform's code, 0 when it took the
    message (what the history and its dashboard read as sent, whatever the channel); None: no
    answer was read (network or HTTP error, timeout, or a reply that is not the API's JSON).
    `outcome`, decided by the channel
    and nowhere else: SENT; THROTTLED (rest the robot, try the next); MISCONFIGURED (out of
    rotation until a reload, try the next); TOO_LONG (split the message); FAILED (try the next
    robot, then retry later). Without one, its channel's (`kind`) reading of the errcode (the
    send log keeps errcodes only)."""
    errcode: object
    errmsg: str
    latency: float = 0.0
    outcome: str = None
    kind: str = DEFAULT_KIND
    rest: float = None      # THROTTLED: seconds the platform said to wait, if it said

    def __post_init__(self):
        if self.outcome is None:
            self.outcome = CHANNELS[self.kind].outcome(self.errcode)

    @property
    def ok(self):
        return self.outcome == SENT


@dataclass(frozen=True)
class Shown:
    """A request as a person would see it: what the preview shows."""
    kind: str           # markdown, actionCard, text
    title: str          # the chat list's line ("" for a text message)
    text: str           # markdown, or plain text
    buttons: tuple      # (label, url)
    markdown: bool = True


class Channel:
    """What every channel shares: made for a config (`config()` gives the running one); a
    credential in the URL's CREDENTIAL_PARAM (a channel may keep it elsewhere); a request of
    LIMIT bytes at most ([delivery] max_message_bytes if less); the body JSON, posted, read by
    read(); a message that fits when nothing of it was cut; an errcode read by the channel's
    code sets, and its FIXES."""

    CREDENTIAL_PARAM = ""
    LIMIT = 1 << 30
    THROTTLE_CODES = CONFIG_CODES = TOO_LONG_CODES = frozenset()
    FIXES = {}              # errcode -> what to do about it, of [robot:{name}]
    TITLE_CHARS = 512       # a title longer than this is cut: the text must fit after it
    RESTS = {}              # a throttle's errcode -> seconds it rests the robot, if known
    SIGNS = True            # whether `secret` means anything to its platform
    AT_BY_MOBILE = True     # whether it can @ a phone number

    def __init__(self, config):
        self.config = config

    @classmethod
    def title(cls, text):
        """A title as a message shows it: cut with an ellipsis past TITLE_CHARS (labels may be
        of any length; a message too long for any robot would never go out)."""
        return text if len(text) <= cls.TITLE_CHARS else text[:cls.TITLE_CHARS - 1] + "…"

    def buttons(self, rendered):
        """The buttons that fit in half a request, in order (a silence link of long labels
        is long): the alert text must fit beside them."""
        room, kept = self.limit() // 2, []
        for label, url in rendered.buttons:
            room -= len(label.encode()) + len(url.encode()) + 64
            if room < 0:
                break
            kept.append((label, url))
        return tuple(kept)

    @classmethod
    def credential(cls, url):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        return (query.get(cls.CREDENTIAL_PARAM) or [""])[0]

    @classmethod
    def with_credential(cls, url, token, where):
        """The URL with a token kept apart (token, token_file, ${ENV}) put in its place."""
        if cls.credential(url):
            raise ConfigError(f"{where}: has an {cls.CREDENTIAL_PARAM} and the token is set "
                              f"apart: one")
        query = urllib.parse.urlsplit(url).query
        return url + ("&" if query else "?") + urllib.parse.urlencode(
            {cls.CREDENTIAL_PARAM: token})

    @classmethod
    def mask(cls, url):
        """The URL as it may be shown: the credential's first four characters."""
        return re.sub(rf"([?&]{cls.CREDENTIAL_PARAM}=)([^&]{{0,4}})[^&]*", r"\1\2***", url)

    def limit(self):
        return min(self.LIMIT, self.config().delivery.max_message_bytes)

    @classmethod
    def post(cls, robot, payload, timeout):
        return post_message(robot, robot.url, payload, timeout, cls.read)

    @classmethod
    def fix(cls, errcode, errmsg, name):
        """What to do, in one line, about a refusal of robot `name`; "" if nothing."""
        return cls.FIXES.get(errcode, "").format(name=name)

    def fits(self, rendered, robot):
        """Whether the message goes to this robot whole (nothing cut)."""
        return TRUNCATED_MARK not in self.shown(self.request(rendered, robot)).text

    @staticmethod
    def encode(request):
        return json.dumps(request, ensure_ascii=False).encode()

    def size(self, request):
        """What of a request its limit() counts, in bytes: the whole body, by default."""
        return len(self.encode(request))

    @classmethod
    def outcome(cls, errcode):
        if errcode == 0:
            return SENT
        if errcode in cls.THROTTLE_CODES:
            return THROTTLED
        if errcode in cls.CONFIG_CODES:
            return MISCONFIGURED
        if errcode in cls.TOO_LONG_CODES:
            return TOO_LONG
        return FAILED


class RobotChannel(Channel):
    """DingTalk's custom group robot (自定义机器人): a JSON body per message, markdown, or an
    actionCard when there are buttons (which cannot @: a text message of its own carries the
    mentions); each @ written in the text as well as in "at"; the robot's keyword at the end;
    the whole body at most max_message_bytes (20,000 at DingTalk), alert text cut with a mark
    beyond that; signed URLs; errcodes classified. `config()` gives the running Config."""

    KIND, NAME = DEFAULT_KIND, "DingTalk"
    CREDENTIAL_PARAM = "access_token"
    PERSON_KEY = "user_id"          # [person:X] user_id: whom atUserIds @-mentions
    RATE_LIMITS = ()                # (count, seconds) windows; (): [delivery] rate_limit's
    THROTTLE_CODES = frozenset({410100, 130101})                # too fast: muted a while
    CONFIG_CODES = frozenset({310000, 300001, 400101, 400102})  # keyword/sign/IP, token, off
    TOO_LONG_CODES = frozenset({460101, 101002})
    DECLARED = ("0", "410100")      # the errcodes whose send counters exist from the start
    NO_CREDENTIAL = "has no access_token parameter"
    PLACEHOLDER_HINTS = {"token": "put the robot's access_token into config.ini",
                         "secret": "put the robot's 加签 secret (SEC...) into config.ini, or "
                                   "remove secret if the robot does not sign"}
    PLACEHOLDERS = {"token": (PLACEHOLDER_TOKEN, "YOUR_ACCESS_TOKEN", "OPS_TOKEN", "LEADS_TOKEN"),
                    "secret": ("SEC_CHANGE_ME", "SEC_YOUR_SIGNING_SECRET")}  # config.ini, docs
    # What to do about a refusal: (errcode, what its errmsg says or None, the fix); the first
    # that matches. DingTalk's errmsg is English in older answers, Chinese in newer ones.
    FIXES = (
        (310000, r"sign|签名|timestamp|时间戳",
         "the signature does not match: set [robot:{name}] secret to the robot's 加签 secret "
         "(SEC...), and check this server's clock (NTP): DingTalk refuses one over an hour off"),
        (310000, r"keyword|关键词",
         "the message lacks the robot's keyword: set [robot:{name}] keyword = one of its "
         "custom keywords (自定义关键词, in the robot's 安全设置)"),
        (310000, r"whitelist|白名单|\bip\b",
         "this server's address{ip} is not in the robot's IP allow-list: add it under the "
         "robot's 安全设置, IP地址(段)"),
        (310000, None,
         "a security check failed: compare [robot:{name}] keyword and secret, and this "
         "server's address, with the robot's 安全设置"),
        (300001, None,
         "DingTalk has no robot with this access_token: copy the robot's Webhook URL into "
         "[robot:{name}] url again (was the robot removed from its group?)"),
        (400101, None,
         "DingTalk has no robot with this access_token: copy the robot's Webhook URL into "
         "[robot:{name}] url again (was the robot removed from its group?)"),
        (400102, None,
         "the robot is turned off (停用) in DingTalk: turn it on in the group's robot settings, "
         "or put another robot's Webhook URL into [robot:{name}] url"),
    )
    IP_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\b[0-9a-fA-F]{1,4}"
                            r"(?::[0-9a-fA-F]{0,4}){2,7}")     # in "ip X not in whitelist"

    # the robot's URL: what in it is the credential
    @staticmethod
    def takes(url):
        """Whether a URL is this channel's robot, for a [robot:NAME] that names no kind."""
        return "access_token" in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query) or \
            urllib.parse.urlsplit(url).hostname == "oapi.dingtalk.com"

    @classmethod
    def mention_text(cls, mentions):
        return " ".join("@" + who for who in mentions.mobiles + mentions.user_ids_of(cls.KIND))

    @classmethod
    def at(cls, mentions):
        at = {"atMobiles": list(mentions.mobiles), "isAtAll": mentions.all}
        if mentions.user_ids_of(cls.KIND):
            at["atUserIds"] = list(mentions.user_ids_of(cls.KIND))
        return at

    def mentions_apart(self, rendered):
        """Whether the message's mentions need a message of their own: an actionCard cannot @."""
        return bool(rendered.buttons and rendered.mentions)

    def request(self, rendered, robot):
        """The body `robot` receives: alert text cut to fit, with a visible mark, if need be."""
        mentions = Mentions() if rendered.buttons else rendered.mentions
        footer = list(rendered.notes) + [t for t in (self.mention_text(mentions), robot.keyword)
                                         if t]
        head = f"#### {self.title(rendered.heading)}\n\n"
        tail = ("\n\n" + "\n\n".join(footer)) if footer else ""
        buttons = self.buttons(rendered)
        if rendered.buttons:
            request = {"msgtype": "actionCard", "actionCard": {
                "title": rendered.title[:128], "text": head + tail,
                "btnOrientation": "1" if len(buttons) <= 2 else "0",
                "btns": [{"title": label, "actionURL": url} for label, url in buttons]}}
        else:
            request = {"msgtype": "markdown",
                       "markdown": {"title": rendered.title[:128], "text": head + tail},
                       "at": self.at(mentions)}
        room = self.limit() - len(self.encode(request))
        text = truncate_to(Renderer.SEPARATOR.join(rendered.blocks), room)
        request[request["msgtype"]]["text"] = head + text + tail
        return request

    def note_request(self, body, robot):
        """A NOTE: its title and text, who it @-mentions, and the robot's keyword."""
        text = "\n\n".join(filter(None, [body.note, self.mention_text(body.mention),
                                          robot.keyword]))
        request = {"msgtype": "markdown", "markdown": {"title": body.title[:128], "text": text}}
        if body.mention:
            request["at"] = self.at(body.mention)
        return request

    def mention_request(self, body, robot):
        """A card's @ message: a text message, who and the card's title."""
        content = " ".join(filter(None, [self.mention_text(body.mention), body.title]))
        if robot.keyword:
            content += "\n" + robot.keyword
        return {"msgtype": "text", "text": {"content": content}, "at": self.at(body.mention)}

    @staticmethod
    def shown(request):
        kind = request["msgtype"]
        content = request[kind]
        if kind == "text":
            return Shown(kind, "", content["content"], (), markdown=False)
        return Shown(kind, content["title"], content["text"],
                     tuple((b["title"], b["actionURL"]) for b in content.get("btns", ())))

    @staticmethod
    def post(robot, payload, timeout):
        return post_to_dingtalk(robot, payload, timeout)

    @classmethod
    def fix(cls, errcode, errmsg, name):
        """What to do, in one line, about DingTalk's refusal of robot `name` (a config error:
        CONFIG_CODES); "" for any other answer."""
        for code, says, fix in cls.FIXES:
            if code == errcode and (says is None or re.search(says, errmsg, re.IGNORECASE)):
                ip = cls.IP_ADDRESS.search(errmsg)
                return fix.format(name=name, ip=f" ({ip.group()})" if ip else "")
        return ""


def signed_url(robot, now_ms=None):
    """The robot URL, with a fresh timestamp and signature when the robot has a secret."""
    if not robot.secret:
        return robot.url
    timestamp = str(now_ms if now_ms is not None else int(time.time() * 1000))
    to_sign = f"{timestamp}\n{robot.secret}".encode()
    digest = hmac.new(robot.secret.encode(), to_sign, hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest))
    return f"{robot.url}&timestamp={timestamp}&sign={sign}"


def post_to_dingtalk(robot, payload, timeout):
    return post_message(robot, signed_url(robot), payload, timeout, _read_dingtalk)


def post_message(robot, url, payload, timeout, read):
    """POST one message to a robot's platform; the exchange takes `timeout` seconds at most, in
    all. `read(status, headers, first 64 KiB)` says what an answer means, an error status's
    too. Never raises: any failure of the exchange is a result without errcode ("no answer"),
    and its errmsg never holds the token or the secret."""
    started = time.monotonic()
    request = urllib.request.Request(url, data=payload, method="POST",
                                     headers={"Content-Type": "application/json; charset=utf-8",
                                              "User-Agent": "alertbridge/" + VERSION})
    with Deadline(timeout) as request.deadline:
        try:
            try:
                response = _OPENER.open(request, timeout=timeout)
            except urllib.error.HTTPError as exc:
                response = exc
            with response:
                result = read(response.getcode(), response.headers, response.read(65536))
        except Exception as exc:  # noqa: BLE001 (whatever breaks, it is "no answer", never a crash)
            result = SendResult(None, _no_answer(exc))
    if result.errcode is None and request.deadline.passed:  # cut short: what was read is partial
        result.errmsg = f"no complete answer within timeout ({timeout:g}s)"
    result.errmsg = robot.redact(result.errmsg)[:500]
    result.latency = time.monotonic() - started
    return result


def _read_dingtalk(status, headers, raw):
    return _read_answer(raw) if status == 200 else SendResult(None, f"HTTP {status}")


def _read_answer(raw):
    try:
        answer = json.loads(raw.decode("utf-8"))
    except ValueError:
        return SendResult(None, "answer is not JSON")
    if not isinstance(answer, dict):
        return SendResult(None, "answer is not a JSON object")
    errcode = answer.get("errcode")
    if not isinstance(errcode, int) or isinstance(errcode, bool):
        return SendResult(None, "answer has no errcode")
    return SendResult(errcode, str(answer.get("errmsg", "")))


class FeishuChannel(Channel):
    """Feishu's (and Lark's) custom bot (自定义机器人): an interactive card per message, its
    header coloured by the highest priority firing (green once none fires), a markdown body,
    URL buttons; mentions written in the card (<at id=...>, by Feishu user id: it cannot @ a
    phone number, which is written as text); the robot's keyword at the end; signed in the
    body (timestamp, sign); 100 a minute and 5 a second per bot, a body at most 20 KB. The
    token is the URL's last path segment."""

    KIND, NAME = "feishu", "Feishu"
    AT_BY_MOBILE = False            # a custom bot @s by open_id or user_id only
    PERSON_KEY = "feishu_id"        # [person:X] feishu_id: an open_id (ou_...) or user_id
    RATE_LIMITS = ((100, 60.0), (5, 1.0))
    LIMIT = 20 * 1024 - 128         # the body, less the timestamp and sign post() adds
    HOOK = "/open-apis/bot/v2/hook/"
    THROTTLE_CODES = frozenset({11232, 99991400})       # frequency limited
    RESTS = {99991400: 1.0}         # the gateway's, of 5 a second
    CONFIG_CODES = frozenset({19001, 19021, 19022, 19024})  # token, sign, IP, keyword
    DECLARED = ("0", "11232")
    NO_CREDENTIAL = "has no token after /open-apis/bot/v2/hook/"
    PLACEHOLDER_HINTS = {"token": "put the bot's webhook URL (…/bot/v2/hook/TOKEN) into "
                                  "config.ini",
                         "secret": "put the bot's 签名校验 secret into config.ini, or remove "
                                   "secret if the bot does not sign"}
    PLACEHOLDERS = {"token": (PLACEHOLDER_TOKEN, "YOUR_HOOK_TOKEN"),
                    "secret": ("YOUR_SIGNING_SECRET",)}
    FIXES = {
        19001: "Feishu has no bot with this webhook: copy the bot's webhook URL into "
               "[robot:{name}] url again (was the bot removed from its group?)",
        19021: "the signature does not match: set [robot:{name}] secret to the bot's 签名校验 "
               "secret, and check this server's clock (NTP): Feishu refuses one over an hour off",
        19022: "this server's address is not in the bot's IP allow-list (IP 白名单): add it "
               "in the bot's 安全设置",
        19024: "the message lacks the bot's keyword: set [robot:{name}] keyword = one of its "
               "custom keywords (自定义关键词)",
    }
    COLOURS = ("red", "orange", "yellow")   # by rank; blue below them; green when resolved
    HEADING = re.compile(r"^#{1,6} +(.*)$", re.M)

    @classmethod
    def takes(cls, url):
        return cls.HOOK in urllib.parse.urlsplit(url).path

    @classmethod
    def credential(cls, url):
        path = urllib.parse.urlsplit(url).path
        return path.partition(cls.HOOK)[2].strip("/") if cls.HOOK in path else ""

    @classmethod
    def with_credential(cls, url, token, where):
        if cls.credential(url):
            raise ConfigError(f"{where}: has a token after /hook/ and the token is set apart: "
                              f"one")
        return url.rstrip("/") + "/" + urllib.parse.quote(token, safe="")

    @classmethod
    def mask(cls, url):
        return re.sub(r"(/hook/)([^/?#]{0,4})[^/?#]*", r"\1\2***", url)

    def mentions_apart(self, rendered):
        return False

    @classmethod
    def mention_marks(cls, mentions):
        """Mentions as the card's markdown writes them (a phone number only as text)."""
        marks = ["<at id=all></at>"] if mentions.all else []
        marks += [f"<at id={user_id}></at>" for user_id in mentions.user_ids_of(cls.KIND)]
        return " ".join(marks + ["@" + mobile for mobile in mentions.mobiles])

    def request(self, rendered, robot):
        """A card: its text cut to fit, with a visible mark, if need be."""
        footer = list(rendered.notes) + [t for t in (self.mention_marks(rendered.mentions),
                                                     robot.keyword) if t]
        tail = ("\n\n" + "\n\n".join(footer)) if footer else ""
        request = self.card(rendered.title, tail, self.buttons(rendered), rendered.rank)
        room = self.limit() - len(self.encode(request))
        text = truncate_to(Renderer.SEPARATOR.join(rendered.blocks), room)
        request["card"]["elements"][0]["content"] = self.HEADING.sub(r"**\1**", text) + tail
        return request

    @classmethod
    def card(cls, title, text, buttons=(), rank=None):
        colour = "green" if rank is None else (cls.COLOURS[rank] if rank < len(cls.COLOURS)
                                               else "blue")
        elements = [{"tag": "markdown", "content": text}]
        if buttons:
            elements.append({"tag": "action", "actions": [
                {"tag": "button", "text": {"tag": "plain_text", "content": label},
                 "type": "primary" if i == 0 else "default", "url": url}
                for i, (label, url) in enumerate(buttons)]})
        return {"msg_type": "interactive", "card": {
            "config": {"wide_screen_mode": True},
            "header": {"title": {"tag": "plain_text", "content": cls.title(title)},
                       "template": colour},
            "elements": elements}}

    def note_request(self, body, robot):
        text = "\n\n".join(filter(None, [body.note, self.mention_marks(body.mention),
                                          robot.keyword]))
        return self.card(body.title, text, rank=len(self.COLOURS))

    def mention_request(self, body, robot):
        """A message of mentions only (after a card another robot of the route sent)."""
        text = " ".join(filter(None, [self.mention_marks(body.mention),
                                      md_escape(self.title(body.title))]))
        return self.card(body.title, text + ("\n\n" + robot.keyword if robot.keyword else ""),
                         rank=len(self.COLOURS))

    @staticmethod
    def shown(request):
        card = request["card"]
        buttons = tuple((b["text"]["content"], b["url"]) for element in card["elements"][1:]
                        for b in element["actions"])
        return Shown("interactive", card["header"]["title"]["content"],
                     card["elements"][0]["content"], buttons)

    @classmethod
    def post(cls, robot, payload, timeout):
        return post_message(robot, robot.url, cls.signed(robot, payload), timeout, cls.read)

    @staticmethod
    def signed(robot, payload, now=None):
        """The body with a fresh timestamp and sign when the bot has a secret: HMAC-SHA256 keyed
        by "timestamp\\nsecret" over nothing, in base64."""
        if not robot.secret:
            return payload
        timestamp = str(int(now if now is not None else time.time()))
        key = f"{timestamp}\n{robot.secret}".encode()
        sign = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
        signature = json.dumps({"timestamp": timestamp, "sign": sign})
        return payload[:-1] + b", " + signature[1:].encode()    # into the body's object

    @classmethod
    def read(cls, status, headers, raw):
        """Feishu's answer: {"code": 0, "msg": "success"} (or StatusCode, as older bots
        answer); a throttle may come as HTTP 429 with the seconds to wait in
        x-ogw-ratelimit-reset."""
        try:
            answer = json.loads(raw.decode("utf-8"))
        except ValueError:
            answer = None
        code = answer.get("code", answer.get("StatusCode")) if isinstance(answer, dict) else None
        said = str(answer.get("msg", answer.get("StatusMessage", ""))) if isinstance(
            answer, dict) else f"HTTP {status}"
        if status == 429 or code in cls.THROTTLE_CODES:
            code = code if code in cls.THROTTLE_CODES else 99991400
            return SendResult(code, said, kind=cls.KIND, outcome=THROTTLED,
                              rest=cls.reset((headers or {}).get("x-ogw-ratelimit-reset"),
                                             cls.RESTS.get(code)))
        if not isinstance(code, int) or isinstance(code, bool):
            return SendResult(None, f"HTTP {status}" if status != 200 else
                              "answer has no code", kind=cls.KIND)
        too_long = status == 413 or (code == 9499 and re.search(r"exceed|too (large|long)",
                                                                said, re.IGNORECASE))
        return SendResult(code, said, kind=cls.KIND, outcome=TOO_LONG if too_long else None)

    @staticmethod
    def reset(header, default):
        """x-ogw-ratelimit-reset's seconds, if it holds a number that can be one."""
        try:
            seconds = float(str(header).strip())
        except ValueError:
            return default
        return seconds if 0 <= seconds < float("inf") else default


class WeComChannel(Channel):
    """WeCom's group robot (企业微信群机器人): markdown, its content at most 4096 bytes; buttons
    become a line of links; a user id is @-mentioned in the markdown (<@userid>), but a phone
    number or everyone only in a text message (mentioned_mobile_list, "@all"), which then
    follows the markdown as a message of its own; 20 a minute per robot; no signing, the key
    in the URL (?key=)."""

    KIND, NAME = "wecom", "WeCom"
    SIGNS = False
    CREDENTIAL_PARAM = "key"
    PERSON_KEY = "wecom_id"         # [person:X] wecom_id: a WeCom userid
    RATE_LIMITS = ((20, 60.0),)
    LIMIT = 4096                    # bytes of markdown content
    TEXT_LIMIT = 2048               # bytes of a text message's content
    THROTTLE_CODES = frozenset({45009})
    CONFIG_CODES = frozenset({93000})
    TOO_LONG_CODES = frozenset({40058})
    DECLARED = ("0", "45009")
    NO_CREDENTIAL = "has no key parameter"
    PLACEHOLDER_HINTS = {"token": "put the robot's webhook URL (…/webhook/send?key=KEY) into "
                                  "config.ini", "secret": ""}
    PLACEHOLDERS = {"token": (PLACEHOLDER_TOKEN, "YOUR_ROBOT_KEY"), "secret": ()}
    FIXES = {93000: "WeCom has no robot with this key: copy the robot's webhook URL into "
                    "[robot:{name}] url again (was the robot removed from its group?)"}

    @staticmethod
    def takes(url):
        parts = urllib.parse.urlsplit(url)
        return parts.path.endswith("/cgi-bin/webhook/send") or parts.hostname == \
            "qyapi.weixin.qq.com"

    def mentions_apart(self, rendered):
        """Whether a text message must follow: markdown cannot @ a phone number or everyone."""
        return bool(rendered.mentions.mobiles or rendered.mentions.all)

    def request(self, rendered, robot):
        """Markdown: its text cut to fit, with a visible mark, if need be."""
        links = " · ".join(f"[{label}]({url})" for label, url in self.buttons(rendered))
        footer = list(rendered.notes) + [t for t in (links, self.marks(rendered.mentions),
                                                     robot.keyword) if t]
        head = f"#### {self.title(rendered.heading)}\n\n"
        tail = ("\n\n" + "\n\n".join(footer)) if footer else ""
        room = self.limit() - len((head + tail).encode())
        text = truncate_to("\n\n".join(rendered.blocks), room)
        return {"msgtype": "markdown", "markdown": {"content": head + text + tail}}

    def note_request(self, body, robot):
        if body.mention.mobiles or body.mention.all:
            return self.text_request(body.title + "\n" + body.note, body.mention, robot)
        content = "\n\n".join(filter(None, [f"#### {self.title(body.title)}", body.note,
                                            self.marks(body.mention), robot.keyword]))
        return {"msgtype": "markdown", "markdown": {"content": content}}

    def mention_request(self, body, robot):
        return self.text_request(body.title, body.mention, robot)

    @classmethod
    def marks(cls, mentions):
        """The user ids markdown can @ (<@userid>); phones and everyone need text_request()."""
        return " ".join(f"<@{user_id}>" for user_id in mentions.user_ids_of(cls.KIND))

    def text_request(self, text, mentions, robot):
        """A text message that @s by user id, phone number or everyone."""
        content = text + ("\n" + robot.keyword if robot.keyword else "")
        users = list(mentions.user_ids_of(self.KIND)) + (["@all"] if mentions.all else [])
        return {"msgtype": "text", "text": {
            "content": truncate_to(content, self.TEXT_LIMIT - 64),
            "mentioned_list": users, "mentioned_mobile_list": list(mentions.mobiles)}}

    @staticmethod
    def shown(request):
        kind = request["msgtype"]
        if kind == "text":
            return Shown(kind, "", request["text"]["content"], (), markdown=False)
        return Shown(kind, "", request["markdown"]["content"], ())

    def size(self, request):
        """WeCom counts the content's bytes (4,096 of markdown), not the body's."""
        return len(request[request["msgtype"]]["content"].encode())

    @classmethod
    def read(cls, status, headers, raw):
        result = _read_dingtalk(status, headers, raw)   # the same errcode and errmsg
        return replace(result, kind=cls.KIND, outcome=None)


class ChannelError(Exception):
    """A channel tried before the robots (or a side call of one: a card's update, a DING) did
    not do it: the robots send the message instead, or the group hears it another way."""


# The channels, by the kind a [robot:NAME] names (or its URL shows): all a kind of robot is.
CHANNELS = {channel.KIND: channel
            for channel in (RobotChannel, FeishuChannel, WeComChannel)}


class Channels:
    """One channel of each kind, made for a config (`config()` gives the running one): each
    robot's requests are written, posted and read by its own (Robot.kind). A receiver may list
    robots of several kinds: what it sends is then sized to fit every one of them whole (the
    narrowest's limit: a message fails over from one robot to the next without a new split),
    and a card's mentions go in a message of their own if any of its robots cannot @ beside
    buttons."""

    def __init__(self, config, kinds=None):
        self._made = {kind: channel(config) for kind, channel in (kinds or CHANNELS).items()}

    def of(self, robot):
        return self._made[robot.kind]

    def limit(self, route):
        """The largest request in bytes every robot of the route takes."""
        return min((self.of(robot).limit() for robot in route.robots),
                   default=self._made[RobotChannel.KIND].limit())

    def fits(self, rendered, route):
        return all(self.of(robot).fits(rendered, robot) for robot in route.robots)

    def mentions_apart(self, rendered, route):
        return any(self.of(robot).mentions_apart(rendered) for robot in route.robots)

    def encode(self, robot, request):
        return self.of(robot).encode(request)

    def post(self, robot, payload, timeout):
        return self.of(robot).post(robot, payload, timeout)


def windows_of(robot, delivery):
    """The (count, seconds) windows a robot's platform counts its messages in, longest first:
    its own rate_limit, else its channel's, else [delivery] rate_limit per rate_window."""
    return (robot.rate_limit or CHANNELS[robot.kind].RATE_LIMITS
            or ((delivery.rate_limit, delivery.rate_window),))


def budget_words(windows):
    """A robot's windows as people read them: "100 msgs/60s and 5 msgs/1s"."""
    return " and ".join(f"{count} msgs/{seconds:g}s" for count, seconds in windows)


def channel_kind(url):
    """The kind of robot a URL is, for a [robot:NAME] that names none (DingTalk's, else)."""
    return next((kind for kind, channel in CHANNELS.items() if channel.takes(url)),
                RobotChannel.KIND)


def classify(robots):
    """read(robot key, errcode) -> (outcome, rest), by each robot's channel: how a send log
    (errcodes only) is read again."""
    kinds = {robot.key: robot.kind for robot in robots}

    def read(key, errcode):
        channel = CHANNELS[kinds.get(key, RobotChannel.KIND)]
        return channel.outcome(errcode), channel.RESTS.get(errcode)
    return read


# =============================================================================================
# 10. Robot pool
# =============================================================================================

class RobotPool:
    """Which robot sends next: a rotating index per route that skips robots out of budget,
    throttled by their platform or misconfigured. A budget slot is taken before a request and
    dated by the request's end, so the platform, counting arrivals, never sees more than a
    window's count in any of the robot's windows (DingTalk's one: 20 a minute; Feishu's two:
    100 a minute and 5 a second). Budgets and throttles belong to the robot as its platform
    knows it, its credential (Robot.key): two sections with one token share one budget.

    Each robot keeps `reserve` of its slots per window for urgent messages (the levels a route's
    reserve_for names), so a critical page goes out at once even when a storm has used the rest.
    Routes that share a robot take turns at it: when a slot frees, a route that has been waiting
    for one goes before a route that has just sent (urgent messages go first regardless).

    A throttle rests the robot for its longest window, then twice as long each time it comes
    again, up to throttle_seconds, or as long as the platform said (SendResult.rest); a message
    it takes ends the run. While a request to a robot has been
    under way for HANGING seconds, the robot takes no other: a hanging robot holds up the
    sender threads that reached it first, not every route that uses it.

    `limits()` gives the current Delivery settings, `windows()` a robot key's windows
    (budget_windows), and `share()` the part of each budget this instance may use (all of it,
    but while a cluster may have instances sending alone); `now` is always an argument.

    _lock guards every dict below, held for arithmetic only (never during a request)."""

    FORGET_WAITING = 10.0   # a route that has not asked for this long is not waited for
    HANGING = 1.0           # a request under way this long: its robot takes no other meanwhile

    def __init__(self, limits, share=lambda: 1.0, classify=None, windows=None):
        self.limits = limits
        self.share = share
        self.classify = classify or (lambda: lambda key, errcode: (RobotChannel.outcome(errcode),
                                                                   None))
        self.windows = windows or (lambda: lambda key: ((limits().rate_limit,
                                                          limits().rate_window),))
        self._lock = threading.Lock()
        self._slots = {}            # robot key -> send end times (inf while in flight)
        self._flights = {}          # robot key -> start times of its requests under way
        self._throttled = {}        # robot key -> time the throttle ends
        self._strikes = {}          # robot key -> throttles in a row
        self._disabled = {}         # robot key -> (errcode, errmsg, since), until a reload
        self._last_sent = {}        # robot key -> when DingTalk last took a message from it
        self._next = {}             # route name -> rotating index
        self._waiting = {}          # route name -> (waiting since, last asked, its robot keys)

    def restore(self, sends, now, forget=False):
        """Rebuild budgets and throttles from a send log, (key, at, errcode) in time order: the
        journal's after a restart; the cluster's, forgetting this instance's own view, when it
        takes over. `classify()` gives read(key, errcode), an errcode as the robot's channel
        reads it: (outcome, rest)."""
        read, windows = self.classify(), self.windows()
        with self._lock:
            if forget:
                self._slots, self._throttled, self._strikes = {}, {}, {}
            for key, at, errcode in sends:
                if at > now - windows(key)[0][1]:
                    self._slots.setdefault(key, []).append(at)
                self._learn(key, *read(key, errcode), at)

    def _learn(self, key, outcome, rest, at):
        """What its channel's answer says of the robot: rested after a throttle, for its longest
        window, longer each time it repeats; for as long as the platform said (`rest`), but its
        shortest window at least, longer each time it repeats. Disabled after a configuration
        error is in release()."""
        if outcome == THROTTLED:
            strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
            windows, again = self.windows()(key), 2 ** min(strikes - 1, 16)
            rest = (windows[0][1] * again if rest is None
                    else max(rest, windows[-1][1] * again))
            rest = min(self.limits().throttle_seconds, rest)
            self._throttled[key] = max(self._throttled.get(key, 0), at + rest)
        elif outcome == SENT:
            self._strikes.pop(key, None)
            self._last_sent[key] = max(self._last_sent.get(key, at), at)

    def forgive(self):
        """Put robots taken out for configuration errors back in use (after a reload)."""
        with self._lock:
            self._disabled.clear()

    def _windows(self, key):
        """The robot's windows as this instance keeps to them: its share of each count (while a
        cluster shares budgets), and a window stretched when the share is less than one slot
        (a 6th of 5 a second: 1 per 1.2 s), so that together the instances keep to it."""
        share, kept = self.share(), []
        for count, seconds in self.windows()(key):
            mine = count * share
            kept.append((int(mine), seconds) if mine >= 1 or mine <= 0 else (1, seconds / mine))
        return kept

    def _capacities(self, key, urgent):
        """[(slots this instance may take, seconds)] for each of the robot's windows, longest
        first (a stretched one may be longer now). The reserve is kept in the first: a shorter
        one (Feishu's 5 a second) holds an urgent message up a moment at most."""
        reserve = 0 if urgent else self.limits().reserve
        return [(count - (min(reserve, count - 1) if i == 0 and count else 0), seconds)
                for i, (count, seconds) in enumerate(self._windows(key))]

    def _capacity(self, key, urgent):
        return max(0, self._capacities(key, urgent)[0][0])

    def _slots_in_window(self, key, now, capacities):
        """The robot's slots within its longest window (inf: in flight); `capacities`, as
        _capacities() gives them."""
        longest = max(seconds for _, seconds in capacities)
        slots = self._slots.setdefault(key, [])
        slots[:] = [t for t in slots if t > now - longest]
        return slots

    def _budget(self, key, now, urgent=True):
        capacities = self._capacities(key, urgent)
        slots = self._slots_in_window(key, now, capacities)
        return min(capacity - sum(1 for t in slots if t > now - seconds)
                   for capacity, seconds in capacities)

    def _usable(self, robot, now):
        return (robot.key not in self._disabled and not robot.placeholder
                and self._throttled.get(robot.key, 0) <= now)

    def _turn_of_another(self, route, robot, now):
        """Whether another route that wants a slot of `robot` has waited longer than `route`."""
        mine = self._waiting.get(route.name, (float("inf"),))[0]
        return any(name != route.name and robot.key in keys and since < mine
                   and now - asked < self.FORGET_WAITING
                   for name, (since, asked, keys) in self._waiting.items())

    def _hanging(self, key, now):
        """Whether a request to the robot has been under way for longer than DingTalk takes to
        answer: then no more go to it until that one ends (its deadline ends it)."""
        flights = self._flights.get(key)
        return bool(flights) and min(flights) < now - self.HANGING

    def _free(self, route, robot, now, urgent):
        return (self._usable(robot, now) and not self._hanging(robot.key, now)
                and self._budget(robot.key, now, urgent) > 0
                and (urgent or not self._turn_of_another(route, robot, now)))

    def available(self, route, now, urgent=True):
        """Messages the route's robots can take right now (`urgent`: the reserve included)."""
        with self._lock:
            keys = {r.key for r in route.robots if self._usable(r, now)}
            return sum(max(0, self._budget(k, now, urgent)) for k in keys)

    def next_slot_at(self, route, now, urgent=True):
        """When the route can next send, if it cannot now (None: not while config stays)."""
        with self._lock:
            times = []
            for robot in route.robots:
                if robot.key in self._disabled or robot.placeholder:
                    continue
                capacities = self._capacities(robot.key, urgent)
                slots = sorted(self._slots_in_window(robot.key, now, capacities))
                free = max(self._free_at(slots, capacity, seconds, now)
                           for capacity, seconds in capacities)
                if free <= now and not urgent and self._turn_of_another(route, robot, now):
                    free = now + 0.05           # a route that waited longer takes it first
                if free <= now and self._hanging(robot.key, now):
                    free = now + 0.5            # its hanging request ends first
                times.append(max(free, self._throttled.get(robot.key, 0)))
            return min(times) if times else None

    @staticmethod
    def _free_at(slots, capacity, seconds, now):
        """When a window of `seconds` holding these slots (sorted) has one free (never: inf,
        with no capacity)."""
        if capacity <= 0:
            return float("inf")
        within = [t for t in slots if t > now - seconds]
        over = len(within) - capacity
        return within[over] + seconds if over >= 0 else now

    def acquire(self, route, now, tried, urgent=True):
        """The next robot in turn with a slot for this message, the slot taken; None if there is
        none. Every robot acquire() returns must be given back with release()."""
        with self._lock:
            robots = route.robots
            start = self._next.get(route.name, 0)
            for step in range(len(robots)):
                robot = robots[(start + step) % len(robots)]
                if robot.key in tried or not self._free(route, robot, now, urgent):
                    continue
                self._next[route.name] = (start + step + 1) % len(robots)
                self._take_slot(robot.key, now)
                if not urgent:
                    self._waiting.pop(route.name, None)
                return robot
            if not urgent and not tried:
                self._wants(route, now)
            return None

    def wants(self, route, now):
        """The route has a message waiting for a slot (its sender says so every few seconds
        while it waits): it is in line for the next slot of its robots."""
        with self._lock:
            self._wants(route, now)

    def _wants(self, route, now):
        since = self._waiting.get(route.name, (now,))[0]
        self._waiting[route.name] = (since, now, {r.key for r in route.robots})

    def take(self, robot, now, urgent=False):
        """A slot of this very robot for a request outside its turns (a test message): True and
        the slot taken (give it back with release()), or False: it has none now."""
        with self._lock:
            if not (self._usable(robot, now) and not self._hanging(robot.key, now)
                    and self._budget(robot.key, now, urgent) > 0):
                return False
            self._take_slot(robot.key, now)
            return True

    def _take_slot(self, key, now):
        self._slots.setdefault(key, []).append(float("inf"))
        self._flights.setdefault(key, []).append(now)

    def _land(self, key):
        """The end of a request under way: its slot no longer in flight."""
        slots, flights = self._slots.setdefault(key, []), self._flights.get(key)
        if float("inf") in slots:
            slots.remove(float("inf"))
        if flights:
            flights.remove(min(flights))

    def cancel(self, robot):
        """Give back the slot acquire() took for a request that was not made."""
        with self._lock:
            self._land(robot.key)

    def release(self, robot, result, now):
        """Date the slot taken by acquire() and learn from DingTalk's answer."""
        with self._lock:
            self._land(robot.key)
            self._slots[robot.key].append(now)
            self._learn(robot.key, result.outcome, result.rest, now)
            if result.outcome == MISCONFIGURED:
                self._disabled[robot.key] = (result.errcode, result.errmsg, now)

    def report(self, robots, now):
        """Each robot's state, by name, for metrics and the status page."""
        with self._lock:
            return [RobotReport(r.name, max(0, self._budget(r.key, now)),
                                self._capacity(r.key, True),
                                self._capacity(r.key, True) - self._capacity(r.key, False),
                                self._throttled.get(r.key, 0),
                                self._disabled.get(r.key), self._last_sent.get(r.key),
                                r.placeholder_key, r.kind)
                    for r in sorted(robots, key=lambda r: r.name)]


@dataclass(frozen=True)
class RobotReport:
    name: str
    budget: int                 # messages it may still send in this window, the reserve included
    capacity: int               # per window, for this instance
    reserve: int
    throttled_until: float      # 0 if it never was
    disabled: tuple             # (errcode, errmsg, since) while disabled, else None
    last_sent_at: float         # None if it has not sent since the start
    placeholder: str            # "token" or "secret" if it has an example's (Robot), else ""
    kind: str = DEFAULT_KIND    # its channel's

    def throttled(self, now):
        return self.throttled_until > now


# =============================================================================================
# 11. Workers: the thread loop, the notifier and its senders, the recorder
# =============================================================================================

class Worker:
    """A loop on a thread it owns: step() while there is work, then sleep until woken or
    sleep_for() has passed. A failing step is retried with growing delays; it is logged when
    the error changes, not on every retry. wait_idle() lets shutdown and tests wait for it."""

    GATHER = 0.005      # after a wake-up, let a burst of writes land: one pass for all of them

    def __init__(self, name):
        self.name = name
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Condition()  # wait_idle() waits on it; the loop notifies it idle
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.retry = Retry(name)

    # for the owner
    def start(self):
        self._thread.start()
        return self

    def wake(self, *_):
        self._wake.set()

    def stop(self):
        self._stopping.set()
        self._wake.set()

    def join(self, timeout):
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def is_alive(self):
        return self._thread.is_alive()

    def wait_idle(self, timeout):
        """Block until backlog() is empty. True if it was before the timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.backlog():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.wake()
                self._idle.wait(min(left, 0.5))
        return True

    # for subclasses
    def step(self):
        """Do some work; True if there may be more right away."""
        raise NotImplementedError

    def backlog(self):
        """How much work is left, for wait_idle()."""
        raise NotImplementedError

    def sleep_for(self):
        return 1.0

    def failed(self, exc):
        """A step raised `exc`; returns seconds to wait (see Retry)."""
        return self.retry.failed(f"{self.name}: {type(exc).__name__}: {exc}; retrying", exc=exc)

    def _loop(self):
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception as exc:  # noqa: BLE001 (a worker must outlive any one failure)
                self._stopping.wait(self.failed(exc))
                continue
            self.retry.worked()
            if not worked:
                with self._idle:
                    self._idle.notify_all()
                if self._wake.wait(self.sleep_for()):
                    self._stopping.wait(self.GATHER)
                self._wake.clear()


class Notifier(Worker):
    """Marks messages nobody could send within max_age expired, and keeps a sender for every
    route that has messages waiting (the journal's, after a restart, or a route gone from the
    config). The senders are the Senders pool's."""

    def __init__(self, config, journal, senders, metrics):
        super().__init__("notifier")
        self.config, self.journal, self.senders, self.metrics = config, journal, senders, metrics

    def wake(self, *_):
        super().wake()
        self.senders.wake()

    def backlog(self):
        return self.journal.backlog()[0]

    def step(self):
        self._expire(self.journal.clock() - self.config().delivery.max_age)
        for name in self.journal.pending_routes():
            self.senders.ensure(name)
        return False

    def _expire(self, older_than):
        for message_id, route_name, request_id in self.journal.expire(older_than):
            log.error("message=%d route=%s request_id=%s expired: no robot could take it within "
                      "max_age; it stays in the journal as 'expired'", message_id, route_name,
                      request_id)
            self.metrics.inc("alertbridge_messages_expired_total", receiver=route_name)


class Senders:
    """THREADS sender threads for every route, however many there are. A route is served by
    one thread at a time (its messages go out in order), the route due earliest first. A step
    makes one request at most, and its deadline (`timeout`) bounds how long a hanging robot
    holds a thread; a robot has RobotPool.IN_FLIGHT requests under way at most, so a hanging
    robot holds up that many threads and the routes it serves, not the others.

    _cond guards _senders, _due and _busy; no request is made while it is held."""

    THREADS = 8
    GATHER = 0.05       # after a new message, let a burst of webhooks land: one look for them all

    def __init__(self, make_sender):
        self._make = make_sender        # route name -> RouteSender
        self._senders = {}              # route name -> RouteSender
        self._due = {}                  # route name -> time.monotonic() it is next due
        self._busy = set()              # routes a thread is serving now
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._serve, name=f"sender-{n + 1}", daemon=True)
                         for n in range(self.THREADS)]

    def ensure(self, name, gather=0.0):
        """The route's sender, made (and due in `gather` seconds) if it had none."""
        with self._cond:
            if name not in self._senders:
                self._senders[name] = self._make(name)
                self._due[name] = time.monotonic() + gather
                self._cond.notify()
            return self._senders[name]

    def wake(self, name=None, gather=0.0):
        """The route (None: every route) is due now, or in `gather` seconds. A thread is woken
        only if that is sooner than it was due: a burst of webhooks wakes one thread once."""
        if name is not None:
            self.ensure(name, gather)
        with self._cond:
            at = time.monotonic() + gather
            sooner = [each for each in ([name] if name is not None else list(self._senders))
                      if self._due.get(each, at + 1) > at]
            for each in sooner:
                self._due[each] = at
            if len(sooner) == 1:
                self._cond.notify()
            elif sooner:
                self._cond.notify_all()

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def stop(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def is_alive(self):
        return all(thread.is_alive() for thread in self._threads)

    def _serve(self):
        while True:
            with self._cond:
                name = self._take()
                if name is None:
                    return
                sender = self._senders[name]
            delay = sender.turn()
            with self._cond:
                self._busy.discard(name)
                if delay is not None:
                    at = time.monotonic() + delay
                    self._due[name] = min(self._due.get(name, at), at)
                if name in self._due:
                    self._cond.notify()         # a thread may be waiting for it, or for sooner

    def _take(self):
        """The free route due earliest, once due (None when stopping). Holds _cond."""
        while not self._stopping:
            free = [(at, name) for name, at in self._due.items() if name not in self._busy]
            if not free:
                self._cond.wait()
                continue
            at, name = min(free)
            left = at - time.monotonic()
            if left > 0:
                self._cond.wait(left)
                continue
            del self._due[name]
            self._busy.add(name)
            return name
        return None


@dataclass(frozen=True)
class Sent:
    """One request a sender made, for what accounts for it (the Signal RouteSender.sent)."""
    route: str
    robot: Robot
    message: Message
    result: SendResult
    at: float           # the bridge's clock, when the answer came
    sent_at: float      # the wall clock, then: what the history keeps


class Ledger:
    """The journal's record of one route's requests: each written ahead (a crash still counts
    it against the robot's budget, dated as late as DingTalk could have received it), then its
    answer, its event for the history and, for a success, its message marked sent, in one
    transaction. Answers the journal cannot take yet (a full disk) wait here in order; a message
    whose success waits is held: never sent twice because the disk was full."""

    def __init__(self, journal, route_name):
        self.journal, self.route_name = journal, route_name
        self.unwritten = []         # (send id, Sent) not yet journaled, oldest first
        self.held = set()           # ids of messages sent whose success is among them

    def begin(self, robot, latest_arrival):
        try:
            return self.journal.begin_send(robot.name, robot.key, latest_arrival)
        except sqlite3.Error as exc:  # paging goes first: send, and journal the answer when we can
            log.warning("route=%s journal not writable (%s): sending without the write-ahead "
                        "record", self.route_name, exc)
            return None

    def end(self, send_id, sent):
        if sent.result.ok:
            self.held.add(sent.message.id)
        self.unwritten.append((send_id, sent))
        self.flush()

    def flush(self):
        while self.unwritten:
            send_id, sent = self.unwritten[0]
            robot, result, message = sent.robot, sent.result, sent.message
            event = send_event(sent.route, robot, message, result, sent.sent_at)
            try:
                self.journal.end_send(send_id, robot.name, robot.key, sent.at, result.errcode,
                                      event, message.id if result.ok else None)
            except sqlite3.Error as exc:
                log.warning("route=%s journal not writable (%s): %d answers wait in memory; "
                            "their messages are not sent again", self.route_name, exc,
                            len(self.unwritten))
                return
            self.unwritten.pop(0)
            self.held.discard(message.id)


class RouteSender:
    """Sends one route's messages, the highest priority first and oldest first within it,
    within every robot's budget (an urgent message may use the robots' reserve). Its stages,
    one turn at a time: choose what goes out next (duplicates a cluster sent dropped; a backlog
    folded into digests of one level; only the newest copy of an alert that waits more than
    once); plan it with the renderer (parts, a card's @ message: what --render and the preview
    show too); deliver it, failing over through the robots; journal it (Ledger); tell `sent`.
    Time is `clock`; a request is `post` (the robot's channel's)."""

    IDLE = 5.0          # longest wait while messages wait: new ones and reloads wake it sooner
    COPIES_KEPT = 100_000

    def __init__(self, name, config, journal, pool, renderer, channels, cluster, metrics,
                 clock, wall, post, sent, ahead=()):
        self.name = name
        self.ahead = ahead          # channels tried first, for the pages they take (the app's)
        self.config, self.journal, self.pool = config, journal, pool
        self.renderer, self.channels, self.cluster = renderer, channels, cluster
        self.metrics, self.clock, self.wall, self.post = metrics, clock, wall, post
        self.sent = sent            # Signal: a Sent for each request made
        self.ledger = Ledger(journal, name)
        self._orphaned = False
        self._newest = {}           # alert key -> id of the newest pending message carrying it
        self._scanned = 0           # the last message id whose keys are in _newest
        self._urgent = True         # whether the first message waiting may use the reserve
        self.retry = Retry(f"sender:{name}")

    # for the Senders pool
    def turn(self):
        """One step; then seconds until the next (0: at once), or None: until woken."""
        try:
            worked = self.step()
        except Exception as exc:  # noqa: BLE001 (a sender must outlive any one failure)
            return self.retry.failed(f"sender:{self.name}: {type(exc).__name__}: {exc}; "
                                     f"retrying", exc=exc)
        self.retry.worked()
        return 0.0 if worked else self.sleep_for()

    def sleep_for(self):
        if self.ledger.unwritten:
            return 1.0
        route = self.config().routes.get(self.name)
        if route is None:
            return None                 # a reload that brings it back wakes every sender
        now = self.clock()
        if self.pool.available(route, now, self._urgent) > 0:
            until = self.journal.next_due_at(self.name)
        else:
            until = self.pool.next_slot_at(route, now, self._urgent)
        return None if until is None else min(self.IDLE, max(0.01, until - now))

    def step(self):
        """Send (or digest, split or drop as superseded) the first due message; True if there
        was one."""
        self.ledger.flush()
        route = self.config().routes.get(self.name)
        if route is None:
            self._report_orphaned()
            return False
        self._orphaned = False
        if not self.cluster.may_send():         # a cluster's standby: its leader sends
            return False
        now = self.clock()
        first = self._first_due(now)
        if first is None:
            return False
        self._urgent = urgent = first.reserve and route.urgent(first.level)
        available = self.pool.available(route, now, urgent)
        if available <= 0:
            if not urgent:
                self.pool.wants(route, now)   # in line for the next slot; said again every wake-up
            return False
        message = self._choose(route, now, available)
        if message is None:
            return True
        try:
            return self.deliver(route, message, urgent)
        except Exception as exc:
            # whatever went wrong, this message waits its turn again and the others go first
            with contextlib.suppress(Exception):
                self._retry_later(message, [f"internal error: {type(exc).__name__}"])
            raise

    # choosing
    def _choose(self, route, now, available):
        """The message to deliver now: the first due, as a digest if more of its level wait
        than the robots may send, with only the newest copies of its alerts. None if there was
        only bookkeeping to do (duplicates dropped, superseded copies finished)."""
        held = self.ledger.held
        due = [m for m in self.journal.due_messages(self.name, now) if m.id not in held]
        due, duplicates = self.cluster.sort_out(due)
        if duplicates:
            self._duplicates(duplicates)
        if not due:
            return None
        message = due[0]
        self._learn_copies()
        same_level = list(itertools.takewhile(lambda m: m.rank == message.rank, due))
        if len(same_level) > available and not message.packed:
            return self._digest(route, same_level)
        return self._newest_copies(message)

    def _duplicates(self, messages):
        """Notifications another instance (or this one, earlier) has sent: finished, not sent."""
        self.journal.finish([m.id for m in messages], "duplicate")
        self.metrics.inc("alertbridge_duplicates_total", len(messages))
        log.info("route=%s %d messages already sent by the cluster: not sent again (message=%s)",
                 self.name, len(messages), ",".join(str(m.id) for m in messages[:10]))

    def _first_due(self, now):
        """The message to go next, read alone: cheap, as a storm wakes the sender often."""
        held = self.ledger.held
        due = [m for m in self.journal.due_messages(self.name, now, limit=1 + len(held))
               if m.id not in held]
        return due[0] if due else None

    def _report_orphaned(self):
        waiting = self.journal.pending_count(self.name)
        if waiting and not self._orphaned:
            log.error("route=%s: %d messages wait for [receiver:%s], which the config no longer "
                      "has: they are kept for it and go out once the section is back (reload), "
                      "or expire after max_age", self.name, waiting, self.name)
        self._orphaned = bool(waiting)

    def _learn_copies(self):
        """Note which pending message carries the newest copy of each alert."""
        if len(self._newest) > self.COPIES_KEPT:      # forget the sent ones: read the pending anew
            self._newest, self._scanned = {}, 0
        for message_id, keys in self.journal.alert_keys_since(self.name, self._scanned):
            for key in keys:
                self._newest[key] = message_id
            self._scanned = message_id

    def _current(self, message):
        """The alerts of `message` that no later waiting message carries again."""
        return [a for a in message.alerts if self._is_current(message, a)]

    def _is_current(self, message, alert):
        return self._newest.get(alert_key(alert), 0) <= message.id

    def _newest_copies(self, message):
        """`message` without the alerts a later message carries again (a repeat of its group, or
        the alert resolved): only the newest state goes out. None if nothing is left of it."""
        current = self._current(message)
        if len(current) == len(message.alerts):
            return message
        if not current:
            self._superseded([message])
            log.info("message=%d route=%s superseded: later messages carry all its alerts",
                     message.id, message.route)
            return None
        return message.narrowed(current)

    def _superseded(self, messages):
        """Messages whose every alert goes out in a later one: finished, and their send keys given
        to the newest message that carries their alerts (marking them sent would drop, across
        a cluster, every copy of a notification nothing has sent yet). Returns the heirs:
        message id -> send keys it takes."""
        heirs = {}
        for message in messages:
            heir = max((self._newest.get(alert_key(a), 0) for a in message.alerts), default=0)
            if heir > message.id and message.send_keys:
                heirs.setdefault(heir, []).extend(message.send_keys)
        if messages:
            self.journal.supersede(messages, heirs)
        return heirs

    def _digest(self, route, due):
        """More messages of this priority wait than the robots may send: fold the oldest into
        one digest as large as DingTalk takes, made only when a robot is free to send it.
        Messages stay whole, but for alerts a later message carries again."""
        renderer, channels = self.renderer, self.channels
        unpacked = list(itertools.takewhile(lambda m: not m.packed, due))

        def sizes():
            at = 0
            for message in unpacked:
                current = self._current(message)
                yield sum(renderer.block_sizes(route, current, start=at))
                at += len(current)
        taken = unpacked[:next(chunk_lengths(sizes(), renderer.room(route, channels, digest=True)))]

        made = {}

        def body(messages):     # one Body per length: the renderer knows it when it is sent
            if len(messages) not in made:
                groups = [m.body.group_labels for m in messages]
                shared = {k: v for k, v in groups[0].items()
                          if all(g.get(k) == v for g in groups)}
                made[len(messages)] = Body(
                    alerts=tuple(a for m in messages for a in self._current(m)),
                    truncated=sum(m.body.truncated for m in messages), group_labels=shared,
                    digest=True, level=messages[0].level)
            return made[len(messages)]
        taken = longest_that_fits(taken,
                                  lambda some: renderer.fits(route, body(some), channels))
        carrying = [m for m in taken if any(self._is_current(m, a) for a in m.alerts)]
        if len(carrying) <= 1:              # the rest are older copies: that one message is all
            heirs = self._superseded([m for m in taken if m not in carrying])
            for message in carrying:
                message.send_keys = message.send_keys + heirs.get(message.id, [])
            return self._newest_copies(carrying[0]) if carrying else None
        send_keys = [key for m in taken for key in m.send_keys]
        [digest] = self.journal.replace(taken, [body(taken)], "merged", [send_keys])
        log.info("route=%s merged %d %s messages (%d alerts) into digest message=%d",
                 route.name, len(taken), digest.level, len(digest.alerts), digest.id)
        self.metrics.inc("alertbridge_digests_total", receiver=route.name)
        return digest

    # planning
    def _replace_by(self, message, bodies, why):
        """The message goes out as these bodies: journaled in its place, the last carrying its
        send keys (the notification is sent once all of it is out)."""
        send_keys = [[]] * (len(bodies) - 1) + [message.send_keys]
        self.journal.replace([message], bodies, "split", send_keys)
        log.info("message=%d route=%s %s: it goes out as %d messages", message.id, self.name,
                 why, len(bodies))

    def _split(self, route, message):
        """Its robot found it too long, though it fits by our count: halves at least."""
        bodies = self.renderer.parts(route, message.body, self.channels)
        if len(bodies) == 1:
            bodies = numbered(message.body, split_in_two(list(message.alerts)))
        self._replace_by(message, bodies, "too long for its robot")

    # delivering
    def deliver(self, route, message, urgent=False):
        """Send one message, failing over through the route's robots (`urgent`: the reserve too).
        True if a request was made, or the message was planned into several."""
        if not message.body.digest:
            self.renderer.look_up_history(route, message.alerts)
        for channel in self.ahead:
            if channel.takes(route, message.body) and self._ahead(channel, route, message):
                return True
        planned = self.renderer.plan(route, message.body, self.channels, packed=message.packed)
        if len(planned) > 1:
            self._replace_by(message, planned, "too long for one request, or a card that @s")
            return True
        tried, errors = set(), []
        while True:
            robot = self.pool.acquire(route, self.clock(), tried, urgent)
            if robot is None:
                break
            tried.add(robot.key)
            result = self._exchange(route, robot, message)
            if result is None:          # no longer the cluster's leader: the message waits
                return True
            if result.ok:
                return True
            errors.append(f"{robot.name}: {result.errcode} {result.errmsg}")
            if result.outcome == TOO_LONG and len(message.alerts) > 1:
                self._split(route, message)
                return True
        if errors:
            self._retry_later(message, errors)
        return bool(tried)

    def _ahead(self, channel, route, message):
        """The message through a channel tried before the robots (the DingTalk app's card):
        True if it took it, or if this instance may no longer send. Whatever fails
        (ChannelError), the robots send it (False). What it sends is accounted as a robot's
        request is (the send log line, metrics, the history), as its `robot`."""
        if not self.cluster.may_send():
            return True
        started = self.clock()
        try:
            done, carried = channel.page(route, message.body, message.level, message.send_keys)
        except ChannelError as exc:
            log.warning("message=%d route=%s %s did not take the page (%s): the robots send "
                        "it", message.id, route.name, channel.robot.name, exc)
            return False
        if done:
            if not carried:
                self.cluster.sent(message.send_keys)
            at = self.clock()
            sent = Sent(route.name, channel.robot, message, SendResult(0, "ok", at - started),
                        at, self.wall())
            self.ledger.end(None, sent)
            self.sent.notify(sent)
        return done

    def _exchange(self, route, robot, message):
        """One request through one robot: written ahead, sent, its budget slot given back
        whatever happens, its answer journaled and told. None, and no request, if the instance
        may no longer send (a cluster's leader whose lease lapsed, as when it was paused)."""
        timeout = self.config().delivery.timeout
        try:
            payload = self.channels.encode(robot, request_body(self.renderer, self.channels,
                                                               route, message.body, robot))
        except BaseException:
            self.pool.cancel(robot)
            raise
        if not self.cluster.may_send():
            self.pool.cancel(robot)
            return None
        result, send_id = SendResult(None, "not sent: internal error"), None
        try:
            send_id = self.ledger.begin(robot, self.clock() + timeout)
            result = self.post(robot, payload, timeout)
        finally:
            done = self.clock()
            self.pool.release(robot, result, done)
        self.cluster.record(robot, result)
        if result.ok:
            self.cluster.sent(message.send_keys)
        sent = Sent(route.name, robot, message, result, done, self.wall())
        self.ledger.end(send_id, sent)
        self.sent.notify(sent)
        return result

    def _retry_later(self, message, errors):
        delivery = self.config().delivery
        delay = retry_delay(message.attempts, delivery.retry_base, delivery.retry_max)
        self.journal.retry_later(message.id, self.clock() + delay, "; ".join(errors))
        log.warning("message=%d route=%s request_id=%s not delivered (attempt %d): %s; "
                    "retry in %.1fs", message.id, self.name, message.request_id,
                    message.attempts + 1, "; ".join(errors), delay)


def send_test_messages(route, renderer, channels, pool, post, clock, timeout, ledger=None):
    """--send-test: one test message through each robot of a route, each within the robot's
    budget (a test during a storm must not cost a 410100); never the urgent reserve.
    `ledger(robot, result, at)` journals each request, when there is a journal. Returns the
    lines to show, and whether every robot took its message."""
    lines, ok = [], True
    body = Body(alerts=(sample_alert(route.name),))
    for robot in route.robots:
        now = clock()
        if robot.placeholder:
            ok = False
            lines.append(f"{robot.name}: not called: {robot.placeholder_words}; put the "
                         f"robot's own into [robot:{robot.name}]")
            continue
        if not pool.take(robot, now):
            ok = False
            free = pool.next_slot_at(replace(route, robots=(robot,)), now, urgent=False)
            when = f"in {format_duration(free - now + 0.999)}" if free else "after a reload"
            lines.append(f"{robot.name}: not sent: no budget for it now (alerts come first; "
                         f"a slot frees {when})")
            continue
        result = SendResult(None, "not sent: internal error")
        try:
            request = request_body(renderer, channels, route, body, robot)
            result = post(robot, channels.encode(robot, request), timeout)
        finally:
            pool.release(robot, result, clock())
        if ledger is not None:
            ledger(robot, result, clock())
        ok = ok and result.ok
        fix = CHANNELS[robot.kind].fix(result.errcode, result.errmsg, robot.name)
        lines.append(f"{robot.name}: errcode={result.errcode} errmsg={result.errmsg} "
                     f"latency_ms={result.latency * 1000:.0f}" + (f"; fix: {fix}" if fix else ""))
    return lines, ok


class Recorder(Worker):
    """Copies journal events into the history store, in order. A store outage only delays it;
    `store_changed` tells (ok, denied) when the store goes down or comes back. Every
    PURGE_EVERY seconds, and at start, it purges what retention_days no longer keeps."""

    BATCH = 200
    GATHER = 0.05       # after a wake-up, let webhooks gather: fewer writes and transactions
    PURGE_EVERY = 600.0
    PURGE_BATCH = 1000

    def __init__(self, config, journal, store, metrics, clock, wall):
        super().__init__("recorder")
        self.config, self.journal, self.store, self.metrics = config, journal, store, metrics
        self.clock, self.wall = clock, wall
        self.store_changed = Signal()
        self.store_ok = None
        self.store_denied = False       # the last failure was a missing privilege
        self._last_purge = None
        self.journal.new_events.listen(self.wake)

    def backlog(self):
        return self.journal.backlog()[2]

    def failed(self, exc):
        if not isinstance(exc, StoreUnavailable):
            return super().failed(exc)
        if self.store_ok is not False or self.store_denied != exc.denied:
            self.store_ok, self.store_denied = False, exc.denied
            self.store_changed.notify(False, exc.denied)
        if exc.denied and LOGIN_REFUSED in str(exc):
            return self.retry.failed(
                f"history store refuses alertbridge's login, alerts wait in the journal: {exc}; "
                f"a restart applies the corrected [database]")
        if exc.denied:
            return self.retry.failed(
                f"history store refuses a privilege to alertbridge's database user, alerts "
                f"wait in the journal: {exc}. Grant what docs/operations.md, \"History in "
                f"MySQL\", lists (ALTER too, for upgrades); no restart is needed")
        return self.retry.failed(f"history store unavailable, alerts wait in the journal: "
                                 f"{exc}", logging.WARNING)

    def step(self):
        """Record one batch; True if there was one."""
        self._housekeeping()
        events = self.journal.unrecorded(self.BATCH)
        if not events:
            if self.store_ok is not True:
                self.store.ping()
                self._recovered()
            return False
        try:
            self._record(events)
        except (StoreUnavailable, sqlite3.Error):
            raise
        except Exception:  # one bad event must not stop the history: find it, set it aside
            for event in events:
                try:
                    self._record([event])
                except (StoreUnavailable, sqlite3.Error):
                    raise
                except Exception as exc:
                    log.error("event=%d could not be recorded (%s); kept in the journal as failed",
                              event[0], exc)
                    self.journal.mark_failed(event[0])
                    self.metrics.inc("alertbridge_record_failures_total")
        self._recovered()
        return True

    def _record(self, events):
        recorded = self.store.record(self.journal.journal_id, events)
        self.journal.mark_recorded(events[-1][0])
        self.metrics.inc("alertbridge_alerts_recorded_total", recorded)

    def _recovered(self):
        if self.store_ok is False:
            log.info("history store reachable again: %s", self.store.describe())
        if self.store_ok is not True:
            self.store_changed.notify(True, False)
        self.store_ok, self.store_denied = True, False

    def _housekeeping(self):
        """Every PURGE_EVERY seconds: drop journal rows that are done and a day old (the history
        keeps them), and history older than retention_days, in small batches."""
        now = self.clock()
        if self._last_purge is not None and now - self._last_purge < self.PURGE_EVERY:
            return
        self._last_purge = now
        config = self.config()
        delivery, retention = config.delivery, timedelta(days=config.database.retention_days)
        self.journal.purge(now - max(86400, delivery.rate_window, delivery.throttle_seconds),
                           relayed_before=now - delivery.max_age - 3600)
        if retention:
            cutoff = db_time(datetime.fromtimestamp(self.wall(), timezone.utc) - retention)
            total, deleted = 0, None
            while deleted != 0 and not self._stopping.is_set():
                deleted = self.store.purge(cutoff, self.PURGE_BATCH)
                total += deleted
            if total:
                log.info("retention: purged %d history rows older than %s UTC", total, cutoff)


# =============================================================================================
# 12. On call: people and rotations, claim links, escalation, silences, the Desk
# =============================================================================================
#
# What happens to an incident once the history has it (Storage keeps incidents, their events and
# notes): who is on call (pure functions of the moment, tested in simulated time), the signed
# links that act on an incident, the escalation chain and the Escalator that takes its steps,
# the NoteRelay that journals what groups hear of their incidents, the Follower that asks
# Alertmanager about silenced ones, and the Desk: claims and silences however they come.

# What the on-call loop says to people (the claim and silence pages, a card's status, the
# answers to commands), by `language`: the incident's route's (language_of); "both" gives the
# Chinese, then the English.
ANSWERS = {
    "en": {
        "claim_page": "alertbridge: claim", "silence_page": "alertbridge: silence",
        "not_set_up": "Claim links are not set up here ([oncall]).",
        "link_damaged": "this link is damaged: open it again from the message",
        "link_forged": "this link was not made by this alertbridge (or is cut): it does nothing",
        "link_expired": "this link has expired: the incident is older than the links last",
        "stale_form": "This form is stale or came from elsewhere: nothing was changed. Open the "
                      "link again.",
        "history_down": "The history cannot be reached now: nothing was changed. Try again in "
                        "a minute.",
        "silenced_already": "Silenced already (silence {silence}).",
        "choose_how_long": "Choose who you are and how long: nothing was changed.",
        "silenced_for": "🔕 Silenced for {hours} h in Alertmanager (silence {silence}) by "
                        "{name}.",
        "choose_who": "Choose who you are: nothing was changed.",
        "nothing_open": "Nothing is open for this page: its alerts resolved (or the history has "
                        "not recorded them yet).",
        "has_it": "{mark}{name} has it, since {since} ({taken} after the page).",
        "open_since": "open since", "receiver": "receiver", "i_am": "I am",
        "silences_these": "It silences every alert that has these labels:",
        "hours": "🔕 {hours} h",
        "silence_max": "A silence lasts {longest} at most here ([oncall] silence_max): nothing "
                       "was changed.",
        "no_labels": "This group has no labels to silence on (group_by in Alertmanager): "
                     "nothing was changed.",
        "grafana_silence": "These alerts come from Grafana, which Alertmanager's silences do "
                           "not reach: silence them in Grafana (the page's Silence link). "
                           "Nothing was changed.",
        "no_api": "Silences need [oncall] alertmanager_api: nothing was changed.",
        "someone_else": "Someone else acted on this just now: nothing was changed. Look again.",
        "resolved_meanwhile": "Nothing is open for this page any more: its alerts resolved "
                              "meanwhile. The silence was not kept.",
        "am_refused": "Alertmanager did not take the silence ({why}): nothing was changed.",
        "silencing_now": "Someone is silencing this just now: look again in a minute.",
        "card_nothing": "Nothing is open for this card (resolved, or not recorded yet): try "
                        "again in a minute.",
        "person_only": "Only people in [person] may silence (a [person:HANDLE] whose user_id "
                       "is yours): nothing was changed.",
        "no_incident": "No open incident #{number}.",
        "unknown_writer": "Who wrote this is not known (no senderStaffId): nothing was changed.",
        "one_to_one": "Commands in a one-to-one chat are for people in [person] (one whose "
                      "user_id is yours): write in your team's group instead.",
        "not_yours": "{number} is not one of your incidents: receiver {route} neither "
                     "@-mentions you nor escalates to you.",
        "not_this_group": "{number} is not one of this group's incidents.",
        "not_open": "#{id} is not open any more.",
        "holder": "#{id}: {holder} has it.",
        "silence_range": "A silence lasts 1m to {longest} here ([oncall] silence_max): "
                         "silence {id} 1h.",
        "silenced_cmd": "#{id} silenced for {duration} (silence {silence}).",
        "no_rotation": "No rotation is set up ([rotation:NAME]).",
        "shift": "{rotation}: {person} until {until}, then {next}",
        "nothing_here": "Nothing is open here.", "nothing_anywhere": "Nothing is open.",
        "older": "… and {count} older.", "open": "open", "acknowledged": "acknowledged",
        "elsewhere": "{count} open in other groups: open all / 告警 全部",
        "not_done": "Not done: {error}. Try again in a minute.",
    },
    "zh": {
        "claim_page": "alertbridge：认领", "silence_page": "alertbridge：静默",
        "not_set_up": "这里没有设置认领链接（[oncall]）。",
        "link_damaged": "链接已损坏：请从消息中重新打开",
        "link_forged": "这个链接不是本 alertbridge 生成的（或不完整）：它什么都不做",
        "link_expired": "链接已过期：事件早于链接的有效期",
        "stale_form": "表单已过期或来自别处：什么都没有改变。请重新打开链接。",
        "history_down": "现在无法访问历史库：什么都没有改变。请一分钟后再试。",
        "silenced_already": "已经静默（静默 {silence}）。",
        "choose_how_long": "请选择你是谁以及静默多久：什么都没有改变。",
        "silenced_for": "🔕 {name} 在 Alertmanager 中静默了 {hours} 小时（静默 {silence}）。",
        "choose_who": "请选择你是谁：什么都没有改变。",
        "nothing_open": "这个页面没有未结束的事件：告警已恢复（或历史库尚未记录）。",
        "has_it": "{mark}{name} 已认领，自 {since} 起（告警后 {taken}）。",
        "open_since": "开始于", "receiver": "接收者", "i_am": "我是",
        "silences_these": "将静默带有以下标签的所有告警：",
        "hours": "🔕 {hours} 小时",
        "silence_max": "这里静默最长 {longest}（[oncall] silence_max）：什么都没有改变。",
        "no_labels": "这个分组没有可用于静默的标签（Alertmanager 的 group_by）：什么都没有改变。",
        "grafana_silence": "这些告警来自 Grafana，Alertmanager 的静默管不到它们：请在 Grafana 中静默"
                           "（消息里的静默链接）。什么都没有改变。",
        "no_api": "静默需要设置 [oncall] alertmanager_api：什么都没有改变。",
        "someone_else": "刚刚有人处理了它：什么都没有改变。请再看一下。",
        "resolved_meanwhile": "这个页面已没有未结束的事件：告警在此期间已恢复。静默未保留。",
        "am_refused": "Alertmanager 没有接受静默（{why}）：什么都没有改变。",
        "silencing_now": "有人正在静默它：请一分钟后再看。",
        "card_nothing": "这张卡片没有未结束的事件（已恢复，或尚未记录）：请一分钟后再试。",
        "person_only": "只有 [person] 中的人可以静默（user_id 是你的 [person:HANDLE]）：什么都没有"
                       "改变。",
        "no_incident": "没有未结束的事件 #{number}。",
        "unknown_writer": "不知道是谁写的（没有 senderStaffId）：什么都没有改变。",
        "one_to_one": "单聊中的命令只对 [person] 中的人有效（user_id 是你的）：请在团队群里写。",
        "not_yours": "{number} 不是你的事件：接收者 {route} 既不 @ 你，也不升级到你。",
        "not_this_group": "{number} 不是本群的事件。",
        "not_open": "#{id} 已经结束。",
        "holder": "#{id}：{holder} 已认领。",
        "silence_range": "这里静默时长为 1m 到 {longest}（[oncall] silence_max）：silence {id} 1h。",
        "silenced_cmd": "#{id} 已静默 {duration}（静默 {silence}）。",
        "no_rotation": "没有设置轮值（[rotation:NAME]）。",
        "shift": "{rotation}：{person} 值班至 {until}，之后是 {next}",
        "nothing_here": "这里没有未结束的事件。", "nothing_anywhere": "没有未结束的事件。",
        "older": "…另有 {count} 个更早的。", "open": "未认领", "acknowledged": "已认领",
        "elsewhere": "其他群还有 {count} 个未结束：open all / 告警 全部",
        "not_done": "未完成：{error}。请一分钟后再试。",
    },
}


def answer(language, key, **values):
    """What the on-call loop says to people, in `language` (see ANSWERS)."""
    if language == "both":
        return answer("zh", key, **values) + " / " + answer("en", key, **values)
    return ANSWERS[language][key].format(**values)


def language_of(config, route_name=None):
    """The language an answer is in: its route's; without one, the receivers' (English if
    they differ)."""
    route = config.routes.get(route_name) if route_name else None
    if route is not None:
        return route.language
    languages = {r.language for r in config.routes.values()}
    return languages.pop() if len(languages) == 1 else "en"


class Refused(Exception):
    """Something asked of the on-call loop that changes nothing: why, as an ANSWERS key and
    its values (str(): English, for logs; say(): in the asker's language)."""

    def __init__(self, key, **values):
        super().__init__(answer("en", key, **values))
        self.key, self.values = key, values

    def say(self, language):
        return answer(language, self.key, **self.values)


class LinkRefused(Refused):
    """A claim or silence link that must change nothing: malformed, forged or expired."""


LINK_ACTIONS = ("claim", "silence")
LINK_MAC_BYTES = 16


def sign_link(secret, route, group_hash, action, expires):
    """The token of a link that acts on the open incident of one route's Alertmanager group
    until epoch `expires`: its fields, then an HMAC-SHA256 of them with the config's secret.
    The group, not an incident id: a page is sent before the history has recorded its incident
    (or while the history is down), and a claim finds the incident open when it comes."""
    fields = base64.urlsafe_b64encode(json.dumps(
        [route, group_hash, action, int(expires)], separators=(",", ":")).encode()).rstrip(b"=")
    mac = hmac.new(secret.encode(), fields, hashlib.sha256).digest()[:LINK_MAC_BYTES]
    return (fields + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()


def read_link(secret, token, now):
    """(route, group_hash, action, expires) of a link token, checked: LinkRefused says why a
    link is not one (the signature first: nothing of a forged link is believed)."""
    fields, dot, mac = token.partition(".")
    try:
        fields_bytes = fields.encode("ascii")
        given = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
    except (UnicodeEncodeError, ValueError):
        raise LinkRefused("link_damaged")
    wanted = hmac.new(secret.encode(), fields_bytes, hashlib.sha256).digest()[:LINK_MAC_BYTES]
    if not dot or not hmac.compare_digest(given, wanted):
        raise LinkRefused("link_forged")
    route, group_hash, action, expires = json.loads(
        base64.urlsafe_b64decode(fields_bytes + b"=" * (-len(fields_bytes) % 4)))
    if now >= expires:
        raise LinkRefused("link_expired")
    return route, group_hash, action, expires


def claim_link(oncall, route_name, group, now, action="claim"):
    """The URL that claims (or silences) the open incident of a route's group, [oncall]
    link_ttl long."""
    token = sign_link(oncall.link_secret, route_name, group, action, now + oncall.link_ttl)
    return f"{oncall.base_url}/incident/{token}"


def due_step(escalation, opened_at, done, now):
    """The step to send now for an incident opened at epoch `opened_at` with `done` steps sent:
    (its number from 1, which is the steps done after it; Step; epoch it was due), or None.
    When several are
    due (after a restart, or a long history outage), only the latest goes out."""
    steps, rounds = escalation.steps, escalation.repeat + 1
    found = None
    for number in range(done, len(steps) * rounds):
        round_, index = divmod(number, len(steps))
        due = opened_at + round_ * steps[-1].after + steps[index].after
        if due > now:
            break
        found = (number + 1, steps[index], due)
    return found


def next_step_at(escalation, opened_at, done):
    """When the next step is due (epoch), or None when the chain is over."""
    steps = escalation.steps
    if done >= len(steps) * (escalation.repeat + 1):
        return None
    round_, index = divmod(done, len(steps))
    return opened_at + round_ * steps[-1].after + steps[index].after


def local_epoch(day, at, tz):
    """The epoch of a local date and time of day in `tz` (a time a DST change skips or
    repeats: as zoneinfo takes it, fold 0)."""
    return datetime.combine(day, at).replace(tzinfo=tz).timestamp()


def shift_of(rotation, at, tz):
    """(number of the shift, its start, its end) at epoch `at`: shifts begin at hand_over_at
    local time every `days` days from `start` (numbered backwards before it)."""
    local = datetime.fromtimestamp(at, tz)
    days = (local.date() - rotation.start).days - (local.time() < rotation.hand_over_at)
    number = days // rotation.days

    def begins(n):
        return local_epoch(rotation.start + timedelta(days=n * rotation.days),
                           rotation.hand_over_at, tz)
    return number, begins(number), begins(number + 1)


def on_call(rotation, at, tz):
    """(Person, until): who is on call in the rotation at epoch `at`, and when that changes
    (the shift's end, an override's start or end). The last listed override that covers `at`
    wins over the others and the shift."""
    number, _, end = shift_of(rotation, at, tz)
    person = rotation.people[number % len(rotation.people)]
    for begins, ends, who in reversed(rotation.overrides):
        if begins <= at < ends:
            person, end = who, ends
            break
    changes = [t for begins, ends, _ in rotation.overrides for t in (begins, ends) if at < t < end]
    return person, min([end] + changes)


def on_call_report(rotations, at, tz):
    """[(rotation, (person, until), (next person, until))]: now and next, for the status page
    and GET /api/oncall."""
    report = []
    for rotation in rotations:
        now = on_call(rotation, at, tz)
        following = on_call(rotation, now[1], tz)
        while following[0] == now[0] and following[1] < now[1] + 366 * 86400:
            following = on_call(rotation, following[1], tz)   # the next one who is someone else
        report.append((rotation, now, following))
    return report


def reached(targets, at, tz):
    """People and rotations -> (mobiles, user ids) of who they are at epoch `at`."""
    people = [t if isinstance(t, Person) else on_call(t, at, tz)[0] for t in targets]
    return ([p.mobile for p in people if p.mobile], [u for p in people for u in p.user_ids])


class AlertmanagerError(Exception):
    """Alertmanager's API did not do what was asked; the text says what it answered."""


class AlertmanagerAPI:
    """Alertmanager's API v2, for what alertbridge does there: make a silence, expire it, and
    list its alerts and silences (silenced alerts get no resolved notification: alertmanager
    #226)."""

    MOST = 64 << 20     # the largest list of alerts or silences read (about 50,000 alerts)

    def __init__(self, base, timeout=10.0):
        self.base, self.timeout = base.rstrip("/"), timeout

    def silence(self, labels, starts, ends, created_by, comment):
        """A silence on exactly these labels, from and until epochs; its id."""
        body = {"matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True}
                             for k, v in sorted(labels.items())],
                "startsAt": _rfc3339(starts), "endsAt": _rfc3339(ends),
                "createdBy": created_by, "comment": comment}
        answer = self._call("POST", "/api/v2/silences", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("silenceID"), str):
            raise AlertmanagerError("the answer has no silenceID")
        return answer["silenceID"]

    def expire(self, silence_id):
        self._call("DELETE", "/api/v2/silence/" + urllib.parse.quote(silence_id, safe=""))

    def alerts(self):
        """Every alert Alertmanager holds, silenced ones too (one request; matched by the
        caller, so that no label value is written into a filter)."""
        answer = self._call("GET", "/api/v2/alerts", limit=self.MOST)
        if not isinstance(answer, list):
            raise AlertmanagerError("the answer is not a list of alerts")
        return [a for a in answer if isinstance(a, dict)]   # one it garbled: none of ours

    def silences(self):
        """Every silence Alertmanager keeps, by id: {"state", "ends" (epoch), "comment",
        "created_by", "starts" (epoch)}; an entry it cannot read is left out."""
        answer = self._call("GET", "/api/v2/silences", limit=self.MOST)
        if not isinstance(answer, list):
            raise AlertmanagerError("the answer is not a list of silences")
        found = {}
        for silence in answer:
            try:
                found[str(silence["id"])] = {
                    "state": silence["status"]["state"], "comment": str(silence["comment"]),
                    "created_by": str(silence.get("createdBy", ""))[:128],
                    "starts": parse_time(silence["startsAt"], "startsAt").timestamp(),
                    "ends": parse_time(silence["endsAt"], "endsAt").timestamp()}
            except (KeyError, TypeError, AttributeError, BadRequest):
                continue
        return found

    def started_at(self):
        """When Alertmanager started (epoch): until its sources send them again, it holds
        none of the alerts it had before (its silences it keeps)."""
        answer = self._call("GET", "/api/v2/status")
        try:
            return parse_time(answer["uptime"], "uptime").timestamp()
        except (KeyError, TypeError, BadRequest):
            raise AlertmanagerError("its status does not say since when it runs (uptime)")

    def _call(self, method, path, body=None, limit=1 << 20):
        try:
            status, raw = exchange_json(method, self.base + path, body, timeout=self.timeout,
                                        limit=limit + 1)
        except NO_ANSWER as exc:
            raise AlertmanagerError(_no_answer(exc)) from exc
        if status >= 400:
            raise AlertmanagerError(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
        if len(raw) > limit:
            raise AlertmanagerError(f"the answer is over {limit >> 20} MiB")
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            raise AlertmanagerError("the answer is not JSON")


def _rfc3339(epoch):
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _ends_after(alert, now):
    """Whether an alert of Alertmanager's API still fires at epoch `now` (its endsAt later)."""
    try:
        ends = parse_time(alert.get("endsAt") or "", "endsAt")
    except BadRequest:
        return True
    return ends is None or ends.timestamp() > now


def on_call_in_use(config):
    """Whether anything can make incident notes: escalation, claim links, the app's desk."""
    return bool(config.oncall.link_secret or config.app.enabled
                or any(r.escalation for r in config.routes.values()))


def unclaimable_escalations(config):
    """What --check-config and the start say of each route that escalates with no way to claim
    its pages (no claim_links, no [app] to claim through): only a resolve ends its chain."""
    if config.app.enabled:
        return []
    oncall = [key for key in ("base_url", "link_secret") if not getattr(config.oncall, key)]
    also = f" (and [oncall] {' and '.join(oncall)})" if oncall else ""
    return [f"receiver {route.name} escalates ([escalation:{route.escalation.name}]) but nobody "
            f"can claim its pages: set claim_links = true in [receiver:{route.name}]{also}; "
            f"until then only a resolve ends its chain"
            for route in config.routes.values() if route.escalation and not route.claim_links]


def silence_grace(config):
    """How long after a silence's end the escalator waits for the follower to say what
    Alertmanager says of it (extended, expired) before taking it as over on its own."""
    return 2 * config.oncall.follow_interval + 10.0


class Escalator(Worker):
    """Escalation, on the instance that sends (alone, or the cluster's leader): every POLL
    seconds, each open incident nobody has claimed, of a route with an escalation for its
    level, gets its due step: notes for the route's group and the groups of the step's
    receivers, @-mentioning the step's people (whoever is on call in its rotations). The history
    marks the step done and keeps its notes in one transaction; the NoteRelay journals them
    here, or on the next leader if this one dies first: each step goes out once whichever
    instance leads (at least once if it dies mid-send). A claim or a resolve ends the chain; a
    silence holds it, and when the silence is over it starts again from the first step.
    Escalation times are the wall clock's, as the history keeps them; the steady `clock` tells
    when the wall clock stepped, and the open incidents' times move with it (STEP)."""

    POLL = 1.0
    BATCH = 1000        # due incidents per round; a full round is followed by another at once
    STEP = 2.0          # seconds the wall clock may move against the steady one between rounds

    def __init__(self, config, store, cluster, metrics, clock, wall, relay, ding=None):
        super().__init__("escalator")
        self.config, self.store, self.cluster, self.metrics = config, store, cluster, metrics
        self.clock, self.wall, self.relay = clock, wall, relay
        self.ding = ding            # ding(user ids, text): the app's DING, if [app] ding is set
        self._escalations = None    # the routes' escalations the schedule was made for
        self._skew = None           # wall - clock, at the last round

    def sleep_for(self):
        return self.POLL

    def failed(self, exc):
        """The history away: the recorder says so; escalation waits for it, as quietly."""
        if not isinstance(exc, (StoreUnavailable, StoreError)):
            return super().failed(exc)
        return self.retry.failed(f"escalator: waiting for the history: {exc}", logging.WARNING,
                                 base=1.0, longest=10.0)

    def step(self):
        config = self.config()
        if not on_call_in_use(config):
            return False
        for state, count in {"open": 0, "acknowledged": 0, **self.store.open_by_state()}.items():
            self.metrics.set("alertbridge_incidents_open", count, state=state)
        if not self.cluster.may_send():
            self._skew = None
            return False
        try:
            self._follow_the_wall()
            escalations = {name: (r.escalation, r.escalate_levels)
                           for name, r in config.routes.items()}
            if escalations != self._escalations:    # started, or reloaded: look at all again
                self.store.reschedule()
                self._escalations = escalations
            return self.escalate(config)
        finally:        # what is decided goes out, whatever this round met
            self.relay.relay()

    def _follow_the_wall(self):
        """If the wall clock stepped since the last round, the open incidents' escalation
        times move by the step: their delays run on, as long as they were."""
        skew = self.wall() - self.clock()
        stepped = skew - self._skew if self._skew is not None else 0.0
        if abs(stepped) > self.STEP:
            moved = self.store.shift_steps(stepped)
            log.warning("escalator: the wall clock stepped %+.0f s: the escalation times of %d "
                        "open incidents moved with it", stepped, moved)
        self._skew = skew       # once moved: a history away meanwhile is asked again

    def escalate(self, config):
        """One round over the incidents due: their steps taken, the others scheduled; True if
        the round was full (more may be due)."""
        now = self.wall()
        due = self.store.due_incidents(epoch_db_time(now), self.BATCH)
        later, steps, lines = [], [], {}
        for incident in due:
            if incident["silence_id"]:
                self._silenced(config, incident, now, later)
            else:
                self._look(config, incident, now, later, steps, lines)
        if later:
            self.store.schedule(later)
        if steps:
            self._take(config, steps, lines, now)
        return len(due) == self.BATCH

    def _look(self, config, incident, now, later, steps, lines):
        """An incident not silenced: its due step into `steps` (and its line, as a DING says
        it, into `lines`), or when to look again into `later`."""
        route = config.routes.get(incident["route"])
        escalation = route.escalation if route else None
        origin = from_db_time(incident["steps_from"] or incident["opened_at"]).timestamp()
        done, steps_from = incident["escalations"], epoch_db_time(origin)
        if escalation is None or incident["level"] not in route.escalate_levels:
            later.append((incident["id"], done, NEVER, steps_from))
            return
        found = due_step(escalation, origin, done, now)
        if found is None:
            following = next_step_at(escalation, origin, done)
            later.append((incident["id"], done, self._text(following), steps_from))
            return
        number, step, _ = found
        following = self._text(next_step_at(escalation, origin, number))
        notes = self._notes(config, route, incident, number, step, now - origin, steps_from)
        steps.append((incident["id"], done, number, following, steps_from, f"step {number}",
                      [note.row() for note in notes]))
        lines[incident["id"]] = WORDS[route.language]["escalated"].format(
            step=number, title=incident["title"], waited=format_duration(now - origin))

    def _silenced(self, config, incident, now, later):
        """A silenced incident come due. Alertmanager says when a silence ends (the Follower
        asks it); if nothing came from there silence_grace after its end (Alertmanager away,
        the api unset since), it is over all the same: a silence being made is let go, a silence
        made ends and the chain starts again."""
        until = from_db_time(incident["silenced_until"])
        over = (until.timestamp() if until else now) + silence_grace(config)
        silence = incident["silence_id"]
        if over > now:
            later.append((incident["id"], incident["escalations"], self._text(over),
                          incident["steps_from"]))
        elif silence.startswith(TAKING):
            self.store.drop_silence(incident["id"], silence)
        elif self.store.unsilence(incident["id"], silence, epoch_db_time(now),
                                  epoch_db_time(now), f"silence {silence} ended"):
            log.info("incident=%s route=%s: its silence %s ended, it escalates again",
                     incident["id"], incident["route"], silence)

    def _notes(self, config, route, incident, number, step, waited, steps_from):
        """The step's notes: one for the route's group and one for each other receiver of
        the step, each with the claim link and the step's mentions."""
        mobiles, user_ids = reached(step.people, self.wall(), config.tz)
        mention = Mentions(tuple(dict.fromkeys(mobiles)), tuple(dict.fromkeys(user_ids)))
        claim = (claim_link(config.oncall, route.name, incident["group_hash"], self.wall())
                 if route.claim_links else "")
        notes = []
        for target in dict.fromkeys((route.name,) + step.routes):
            words = WORDS[config.routes[target].language]
            line = words["escalated"].format(step=number, title=md_escape(incident["title"]),
                                             waited=format_duration(waited))
            link = f"\n\n👉 [{words['claim']}]({claim})" if claim else ""
            key = note_key(ESCALATED, incident["id"], steps_from, number, target)
            notes.append(Note(key, incident["id"], target, ESCALATED, incident["level"],
                              line + link, mention))
        return notes

    def _take(self, config, steps, lines, wall):
        """Mark the steps done with their notes, in one transaction; count, log and DING the
        ones this instance took."""
        taken = set(self.store.escalate(steps, epoch_db_time(wall)))
        dinged, said = [], [lines[i] for i in lines if i in taken]
        for incident_id, _, number, _, _, _, notes in steps:
            if incident_id not in taken:
                continue
            first = Note.of_row(notes[0])       # the route's own group's
            route = config.routes[first.route]
            self.metrics.inc("alertbridge_escalations_total", receiver=route.name)
            log.info("incident=%s route=%s escalation step %d (%s)", incident_id, route.name,
                     number, route.escalation.name)
            dinged += first.mention.user_ids_of(DEFAULT_KIND)     # a DING reaches DingTalk's
        if dinged and self.ding is not None and config.app.ding != "none":
            self._ding(tuple(dict.fromkeys(dinged)), said)

    def _ding(self, user_ids, lines):
        """One DING for the round's steps, on a thread of its own: a slow DingTalk holds no
        escalation. Best effort, from the instance that took the steps: the @ in the notes is
        what a leader change does not lose."""
        text = "\n".join(lines[:5] + ([f"+{len(lines) - 5}"] if lines[5:] else []))

        def ding():
            try:
                self.ding(user_ids, text)
            except ChannelError as exc:
                log.warning("escalator: the DING of %d steps failed (%s): their notes "
                            "@-mention them still", len(lines), exc)
        threading.Thread(target=ding, name="ding", daemon=True).start()

    @staticmethod
    def _text(epoch):
        """An epoch as the history keeps times; None (never) as NEVER."""
        if epoch is None:
            return NEVER
        return epoch_db_time(epoch)


class NoteRelay:
    """Journals the history's incident notes on the instance that sends (the escalator calls
    it every round): notes of one route and kind that wait together go out as one message, the
    first LISTED in full (many incidents open at once in an outage; their steps must not take
    the budget that new pages need). While a route's message of that kind waits to be sent,
    newer notes wait in the history, to be folded into the next; a route's notes waiting never
    keep another's from its turn (the history is asked for the others). An escalation ranks
    after the pages of its level (before the next level's) and never uses the reserve. A note
    goes out once across a cluster: the journal takes each key once, the cluster's send keys drop
    what another instance sent, and a sent note is marked sent when its send is recorded."""

    LISTED = 10
    BATCH = 1000

    def __init__(self, config, store, journal, cluster, wall):
        self.config, self.store, self.journal = config, store, journal
        self.cluster, self.wall = cluster, wall
        self._waiting = {}          # (route, kind) -> the id of its message waiting here

    def relay(self):
        config, wall, me = self.config(), self.wall(), self.journal.journal_id
        since = epoch_db_time(wall - config.delivery.max_age)   # older ones expired unsent
        self._waiting = {pair: message for pair, message in self._waiting.items()
                         if self.journal.pending(message)}
        notes = [Note.of_row(row) for row in self.store.unsent_notes(
            since, me, sorted(self._waiting), self.BATCH)]
        here = {n.key for n in notes if self.journal.relayed(n.key)}   # a crash came between
        if here:
            self.store.notes_relayed(sorted(here), me)
        fresh = [n for n in notes if n.key not in here]
        sent = self.cluster.sent_among([n.key for n in fresh]) if fresh else set()
        if sent:
            self.store.notes_sent(sorted(sent), epoch_db_time(wall))
        waiting = {}
        for note in fresh:
            if note.key not in sent:
                waiting.setdefault((note.route, note.kind), []).append(note)
        for (route_name, kind), group in waiting.items():
            route = config.routes.get(route_name) or DEFAULT_ROUTE
            self._waiting[route_name, kind] = self._journal(route, route_name, kind, group, wall)
            self.store.notes_relayed([n.key for n in group], me)

    def _journal(self, route, route_name, kind, notes, wall):
        words = WORDS[route.language]
        text = "\n\n".join(n.text for n in notes[:self.LISTED])
        if len(notes) > self.LISTED:
            text += "\n\n" + words["more"].format(count=len(notes) - self.LISTED)
        title = notes[0].text.split("\n")[0][:120] + (f" +{len(notes) - 1}" if notes[1:] else "")
        mention = Mentions(tuple(dict.fromkeys(m for n in notes for m in n.mention.mobiles)),
                           tuple(dict.fromkeys(u for n in notes for u in n.mention.user_ids)))
        if kind == ESCALATED:
            rank, level = min(route.level({"labels": {route.priority_label: n.level}})
                              for n in notes)
            rank += 0.5     # after the pages of its level, before the next level's
        else:
            rank, level = len(route.priority_order) + 1, NO_LEVEL
        age = max(0.0, wall - min(from_db_time(n.created_at).timestamp() for n in notes))
        return self.journal.note(route_name, title, text, rank, [n.key for n in notes], level,
                                 mention, f"notes:{kind}", kind != ESCALATED, age, relayed=True)


class Follower(Worker):
    """Alertmanager sends no resolved notification for silenced alerts (alertmanager #226), and
    a silence may be extended, or expired, in its UI. On the instance that sends, every
    follow_interval seconds, one look at Alertmanager (its status, its alerts, its silences:
    three requests, each within the API's deadline, whatever the number of incidents) settles
    every silenced incident: its alerts gone, it is resolved and its silence expired early (not
    if Alertmanager started since the silence, less than FRESH ago: it knows its alerts again
    only as its sources send them); its silence not active, it escalates again; its end moved, the
    incident's moves with it; a silence being made whose maker died is kept if Alertmanager
    made it (found by its marker), let go if not. On a thread of its own: a slow or hanging
    Alertmanager holds no escalation step, only this."""

    BATCH = 10_000
    FRESH = 300.0

    def __init__(self, config, store, cluster, wall):
        super().__init__("follower")
        self.config, self.store, self.cluster, self.wall = config, store, cluster, wall

    def backlog(self):
        return 0

    def sleep_for(self):
        return self.config().oncall.follow_interval

    def failed(self, exc):
        if not isinstance(exc, (AlertmanagerError, StoreUnavailable, StoreError)):
            return super().failed(exc)
        return min(self.sleep_for(), self.retry.failed(
            f"follower: cannot follow silenced incidents now: {exc}", logging.WARNING,
            base=1.0))

    def step(self):
        config = self.config()
        if not config.oncall.alertmanager_api or not self.cluster.may_send():
            return False
        incidents = self.store.silenced_incidents(self.BATCH)
        if not incidents:
            return False
        api = AlertmanagerAPI(config.oncall.alertmanager_api)
        started = api.started_at()
        alerts, silences = api.alerts(), api.silences()
        for incident in incidents:
            if incident["silence_id"].startswith(TAKING):
                self._adopt(config, incident, silences)
            else:
                self._settle(config, api, incident, alerts, silences, started)
        return False

    def _settle(self, config, api, incident, alerts, silences, started):
        now = self.wall()
        at, silence_id = epoch_db_time(now), incident["silence_id"]
        silence = silences.get(silence_id) or {"state": "gone", "starts": now}
        knows = started < silence["starts"] or now - started >= self.FRESH  # no restart since
        if knows and not any(self._of(incident, a) and _ends_after(a, now) for a in alerts):
            if self.store.resolve_silenced(incident["id"], at, "its alerts are gone"):
                log.info("incident=%s route=%s resolved: its silenced alerts are gone",
                         incident["id"], incident["route"])
                try:
                    api.expire(silence_id)
                except AlertmanagerError as exc:
                    log.warning("incident=%s: silence %s not expired: %s", incident["id"],
                                silence_id, exc)
        elif silence["state"] != "active":
            if self.store.unsilence(incident["id"], silence_id, at, at,
                                    f"silence {silence_id} is {silence['state']} in "
                                    f"Alertmanager"):
                log.info("incident=%s route=%s: silence %s is %s in Alertmanager: it escalates "
                         "again", incident["id"], incident["route"], silence_id,
                         silence["state"])
        elif abs(silence["ends"] - incident["silenced_until"]) >= 1.0:
            self.store.silence_until(incident["id"], silence_id, epoch_db_time(silence["ends"]),
                                     epoch_db_time(silence["ends"] + silence_grace(config)))

    def _adopt(self, config, incident, silences):
        """A silence being made: kept if Alertmanager made it (its comment carries the
        marker), let go once the marker lapsed if not."""
        marker, now = incident["silence_id"], self.wall()
        made = [(i, s) for i, s in silences.items()
                if s["state"] == "active" and f"({marker})" in s["comment"]]
        if made:
            silence_id, silence = made[0]
            self.store.silenced(incident["id"], marker, silence_id,
                                epoch_db_time(silence["ends"]),
                                epoch_db_time(silence["ends"] + silence_grace(config)),
                                silence["created_by"], epoch_db_time(now),
                                (silence["ends"] - silence["starts"]) / 3600, "alertmanager")
            log.info("incident=%s: silence %s, made as its maker stopped, kept",
                     incident["id"], silence_id)
        elif incident["silenced_until"] < now:
            self.store.drop_silence(incident["id"], marker)

    @staticmethod
    def _of(incident, alert):
        """Whether an alert of Alertmanager's API is one of the incident's: its group's labels,
        sent to its receiver. Matched here, so no label value is written into a matcher."""
        labels = alert.get("labels") if isinstance(alert, dict) else None
        if not isinstance(labels, dict):
            return False
        receivers = alert.get("receivers")
        names = {r.get("name") for r in receivers if isinstance(r, dict)} \
            if isinstance(receivers, list) else set()
        return all(labels.get(k) == v for k, v in incident["group_labels"].items()) and (
            not names or incident["receiver"] in names)


class DeskRefused(Refused):
    """An action on an incident that cannot be done: `status` (HTTP) and why, for people."""

    def __init__(self, status, key, **values):
        super().__init__(key, **values)
        self.status = status


class Desk:
    """What people do to an incident, whichever way they reach it (a signed link's page, a
    card's button, a command written to the app robot): claim it, silence it in Alertmanager.
    Each is kept in the history with how it came (`via`), measured, and told to the group:
    on the incident's card if it has one (`tell_card(route, group, state, status)`), else in a
    note the history keeps until it is sent (see NoteRelay). What happened (claimed, silenced)
    is the card's state. A silence is taken in the history first (compare-and-set), so that of
    two taps, on one instance or two, one makes it and the other hears "silenced already"."""

    SILENCE_HOURS = (1, 4, 24)
    TAKE_FOR = 60.0     # how long a silence being made holds the incident if its maker dies

    def __init__(self, config, store, metrics, wall, tell_card=None):
        self.config, self.store, self.metrics = config, store, metrics
        self.wall, self.tell_card = wall, tell_card

    def claim(self, route, group, chosen, name, via):
        """`chosen` (a handle, or a name or user id) takes the group's open incident: the
        incident (see Store.claim), or None if nothing is open."""
        incident = self.store.claim(route, group, chosen, epoch_db_time(self.wall()), via)
        if incident is not None and incident["claimed"]:
            log.info("incident=%s route=%s claimed by %s via %s", incident["id"], route, chosen,
                     via)
            self.metrics.observe("alertbridge_time_to_acknowledge_seconds",
                                 self.seconds_to_acknowledge(incident), route=route,
                                 level=incident["level"])
            self._tell(route, group, CLAIMED, incident, (), name=md_escape(name),
                       title=md_escape(incident["title"]), after=self.taken(incident))
        return incident

    def silence(self, route, group, hours, chosen, name, via):
        """An Alertmanager silence on the open incident's group labels for `hours`: the
        incident and the silence's id; DeskRefused says why not (nothing was changed)."""
        config = self.config()
        incident = self.store.open_incident(route, group)
        if incident is None:
            raise DeskRefused(200, "nothing_open")
        self._refuse_if_silenced(incident)
        if hours * 3600 > config.oncall.silence_max + 0.5:
            raise DeskRefused(400, "silence_max",
                              longest=format_duration(config.oncall.silence_max))
        if incident.get("source") == GRAFANA:   # Alertmanager does not hold its alerts
            raise DeskRefused(409, "grafana_silence")
        if not incident["group_labels"]:
            raise DeskRefused(409, "no_labels")
        if not config.oncall.alertmanager_api:
            raise DeskRefused(409, "no_api")
        marker, wall, grace = TAKING + secrets.token_hex(8), self.wall(), silence_grace(config)
        if not self.store.take_silence(incident["id"], marker,
                                       epoch_db_time(wall + self.TAKE_FOR),
                                       epoch_db_time(wall + self.TAKE_FOR + grace),
                                       epoch_db_time(wall)):
            self._refuse_if_silenced(self.store.open_incident(route, group) or incident)
            raise DeskRefused(200, "someone_else")
        silence = self._make_silence(config, incident, marker, hours, name, wall)
        until = wall + hours * 3600
        try:
            kept = self.store.silenced(incident["id"], marker, silence, epoch_db_time(until),
                                       epoch_db_time(until + grace), chosen,
                                       epoch_db_time(wall), hours, via)
        except BaseException:
            self._unmake(config, incident, silence)
            raise
        if not kept:    # resolved while Alertmanager made it: nothing left to silence
            self._unmake(config, incident, silence)
            raise DeskRefused(200, "resolved_meanwhile")
        log.info("incident=%s route=%s silenced %g h by %s via %s (silence %s)", incident["id"],
                 route, hours, chosen, via, silence)
        self._tell(route, group, SILENCED, incident, (silence,), name=md_escape(name),
                   title=md_escape(incident["title"]), hours=f"{hours:g}")
        return incident, silence

    def _make_silence(self, config, incident, marker, hours, name, wall):
        """The silence in Alertmanager, for an incident taken with `marker`; if Alertmanager
        does not make it, the incident is let go (DeskRefused)."""
        api = AlertmanagerAPI(config.oncall.alertmanager_api)
        try:
            return api.silence(incident["group_labels"], wall, wall + hours * 3600, name,
                               f"alertbridge: from DingTalk, incident {incident['id']} "
                               f"({marker})")
        except AlertmanagerError as exc:
            log.warning("incident=%s: Alertmanager did not take the silence: %s",
                        incident["id"], exc)
            self.store.drop_silence(incident["id"], marker)
            raise DeskRefused(502, "am_refused", why=str(exc))
        except BaseException:
            self.store.drop_silence(incident["id"], marker)
            raise

    def _unmake(self, config, incident, silence):
        """The history did not take the silence Alertmanager made: expire it, so that nothing
        mutes the group that alertbridge does not know of (the marker lapses on its own)."""
        try:
            AlertmanagerAPI(config.oncall.alertmanager_api).expire(silence)
        except AlertmanagerError as exc:
            log.error("incident=%s: silence %s made but not kept in the history, and not "
                      "expired (%s): expire it in Alertmanager", incident["id"], silence, exc)

    def _refuse_if_silenced(self, incident):
        if self.silenced_now(incident, self.wall()):
            if incident["silence_id"].startswith(TAKING):
                raise DeskRefused(200, "silencing_now")
            raise DeskRefused(200, "silenced_already", silence=incident["silence_id"])

    @classmethod
    def hours_offered(cls, config):
        """The silences a page offers: those [oncall] silence_max allows."""
        return [h for h in cls.SILENCE_HOURS if h * 3600 <= config.oncall.silence_max]

    @staticmethod
    def silenced_now(incident, wall):
        """Whether an incident's silence holds at `wall` (one that ended is over)."""
        until = incident and incident["silence_id"] and from_db_time(incident["silenced_until"])
        return bool(until and until.timestamp() > wall)

    @staticmethod
    def seconds_to_acknowledge(incident):
        return (from_db_time(incident["acknowledged_at"])
                - from_db_time(incident["opened_at"])).total_seconds()

    @classmethod
    def taken(cls, incident):
        """How long the incident waited for its claim, as people read it."""
        return format_duration(cls.seconds_to_acknowledge(incident))

    def _tell(self, route_name, group, what, incident, identity, **words):
        """The group hears it: on the incident's card, else in a note (WORDS[what] in the
        route's language) that goes out after its pages, once per incident and `identity`."""
        route = self.config().routes.get(route_name)
        if route is None:
            return
        text = WORDS[route.language][what].format(**words)
        if self.tell_card is not None and route.app_group:
            try:
                if self.tell_card(route_name, group, what, text):
                    return
            except ChannelError as exc:
                log.warning("incident=%s: the card was not updated (%s): a message tells it",
                            incident["id"], exc)
        note = Note(note_key(what, incident["id"], *identity), incident["id"], route.name, what,
                    NO_LEVEL, text)
        try:
            self.store.add_notes([note.row()], epoch_db_time(self.wall()))
        except (StoreUnavailable, StoreError) as exc:
            log.warning("incident=%s: the group is not told it was %s: the history did not "
                        "keep the note (%s)", incident["id"], what, exc)


def pages_person(route, person):
    """Whether a route's pages or its escalation reach `person`, as the config names them: in
    at_people, at_map or an escalation step (themselves, or in a rotation named there, on call
    now or not, overrides too), or by their user_id or mobile in at_user_ids, at_mobiles or
    at_map. Who alerts' labels add (at_user_ids_from) is not known ahead: not counted."""
    named = list(route.at_people) + [n for entry in route.at_map for n in entry[3]]
    if route.escalation is not None:
        named += [n for step in route.escalation.steps for n in step.people]
    handles = set()
    for target in named:
        if isinstance(target, Rotation):
            handles.update(p.handle for p in target.people)
            handles.update(override[2].handle for override in target.overrides)
        else:
            handles.add(target.handle)
    user_ids = set(route.at_user_ids).union(*(entry[2] for entry in route.at_map))
    mobiles = set(route.at_mobiles).union(*(entry[1] for entry in route.at_map))
    return (person.handle in handles or bool(person.user_id and person.user_id in user_ids)
            or bool(person.mobile and person.mobile in mobiles))


# =============================================================================================
# 13. Cluster: several instances on one MySQL, each page sent once
# =============================================================================================

LEADER, STANDBY, ALONE = "leader", "standby", "alone"


def lease_clock():
    """Seconds on a clock that goes on while the process is stopped (SIGSTOP) or its machine
    is suspended: what a lease is measured with, so that a leader that was paused knows it."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") \
        else time.monotonic()


# The cluster's rules, as pure functions of what an instance knows and of its lease clock's
# `now`: unit-tested in simulated time (tests/test_cluster_rules.py).

def role_after(role, leading, quiet, lease, window):
    """The role after a turn: `leading` is MySQL's answer on the lease (None: MySQL did not
    answer, for `quiet` seconds now). Without MySQL the leader goes ALONE after a lease; a
    standby after two leases and a window: the leader has seen it go missing by then, and its
    own last sends at the full budget have aged out of the window."""
    if leading is None:
        patience = lease if role == LEADER else 2 * lease + window
        return ALONE if role != ALONE and quiet >= patience else role
    return LEADER if leading else STANDBY


def lease_end(started, lease):
    """Until when a leader that renewed its lease at `started` may send: a third of a lease
    before MySQL lets another take over, so that a request begun just before still ends first."""
    return started + lease * 2 / 3


def may_send(role, now, lease_until):
    return role == ALONE or (role == LEADER and now < lease_until)


def budget_share(role, now, sharing_until, missing, instances):
    """The part of each robot's budget an instance may use: 1/instances while it sends alone,
    for a window after (its sends of that time are nowhere recorded), and, leading, while
    instances are missing (each may be sending alone); all of it otherwise."""
    alone = role == ALONE or now < sharing_until or (role == LEADER and missing)
    return 1.0 / instances if alone else 1.0


def missing_after(instances, alive, since, now, presumed_alone):
    """(instances presumed to send alone, since when they are missing): the ones `instances`
    promises but that do not check in, until they have been missing presumed_alone seconds."""
    missing = max(0, instances - 1 - alive)
    since = None if not missing else now if since is None else since
    if missing and now - since >= presumed_alone:
        missing = 0
    return missing, since


class Solo:
    """One instance, the default: it sends everything it journals, with every robot's budget."""

    role = LEADER
    missing = 0

    def may_send(self):
        return True

    def share(self):
        return 1.0

    def sort_out(self, messages):
        return messages, []

    def sent(self, keys):
        pass

    def sent_among(self, keys):
        return set()

    def record(self, robot, result):
        pass

    def wake(self, *_):
        pass

    def start(self):
        return self

    def stop(self):
        pass

    def join(self, timeout):
        pass

    def is_alive(self):
        return True


class Coordinator(Worker):
    """The shared MySQL coordinates the instances of a cluster; nothing else is needed.

    - Membership: every instance checks in every lease/3 seconds (cluster_members). A second
      process with a name already checked in by another stays out of the lease and says so.
    - One leader at a time sends: a lease row taken or kept with one atomic UPDATE at each
      check-in. The leader sends only while its lease holds by its own clock (lease_clock: it
      goes on while the process is paused), which ends a third of a lease before MySQL's does:
      a leader paused past its lease does not send on as leader when it resumes.
    - Every instance journals every webhook it is given and records it in the history. The
      leader registers the send keys of what it journals (cluster_claims); a standby hands the
      leader, through MySQL (cluster_handoff), any message older than a lease whose send keys the
      leader has not registered: a webhook that reached only a standby is sent too. A standby
      drops its copies of notifications the leader has sent.
    - Before the leader sends, it takes each notification's send key (send_key): a notification
      sent within duplicate_window, by any instance, is not sent again (Alertmanager's retries
      and HA peers send the same one more than once). Once DingTalk takes it, it is marked sent.
    - Every request to DingTalk is logged in MySQL too: an instance that takes over starts from
      the budgets and throttles the cluster has used, not from its own.
    - A leader that dies loses its lease after `lease` seconds; a standby takes over and sends
      what was not marked sent (what was in flight at the crash may go twice).
    - Without MySQL for a while (the leader: a lease; a standby: two leases and a window, so
      that the leader has seen it go missing and its last sends have aged), an instance sends
      ALONE, with 1/instances of each robot's budget. While fewer of the `instances` check in
      than there should be (for up to presumed_alone seconds), the leader presumes the missing
      ones send alone and keeps to its share too, so that together they never exceed a robot's
      budget. Duplicates are then possible, counted and logged. What was sent alone is marked
      sent when MySQL is back.

    Threads: the "cluster" thread runs step(); senders call may_send(), sort_out(), sent() and
    record(). _lock makes the statements on the one MySQL session one at a time; role, the
    lease's end and the missing count are plain values, replaced whole."""

    UNREPORTED_KEPT = 10_000
    REGISTER_BATCH = 2000       # send keys the leader registers per step
    HANDOFF_BATCH = 200         # messages handed off, or adopted, per step

    def __init__(self, settings, delivery, database, journal, pool, metrics, clock=lease_clock,
                 window=None):
        super().__init__("cluster")
        self.settings, self.delivery = settings, delivery
        self.window = window or (lambda: delivery().rate_window)  # the longest budget window
        self.journal, self.pool, self.metrics = journal, pool, metrics
        self.role_changed = Signal()            # the new role, after it changed
        self.clock = clock
        self.me = settings.instance
        self.incarnation = uuid.uuid4().hex
        self.role = STANDBY
        self.missing = 0                        # other instances not checking in, presumed alone
        self._missing_since = None
        self.conflict = None                    # (host, pid) of a live namesake, if any
        self._store = Store(database, schema=CLUSTER_SCHEMA, autocommit=True)
        self._lock = threading.Lock()           # one statement at a time on the session
        self._contact = clock()                 # when MySQL last answered
        self._lease_until = 0.0                 # by self.clock: the leader may send until then
        self._unreported = []                   # keys sent while MySQL was away
        self._registered = 0                    # the last journal message whose send keys we told
        self._offered = 0                       # the last journal message a standby looked at
        self._last_purge = None
        self._sharing_until = 0.0               # after ALONE: budgets stay shared for a window

    # what the senders ask
    def may_send(self):
        """Whether this instance may send now: alone, or the leader with its lease still held
        by its own clock (asked again right before each request)."""
        return may_send(self.role, self.clock(), self._lease_until)

    def share(self):
        return budget_share(self.role, self.clock(), self._sharing_until, self.missing,
                            self.settings.instances)

    def sort_out(self, messages):
        """(messages to send, messages already sent as the same notification): the first
        taken for this instance, the others to be finished as duplicates."""
        keys = sorted({key for m in messages for key in m.send_keys})
        if not keys or self.role == ALONE:
            return messages, []
        try:
            sent = self._take(keys)
        except StoreUnavailable:            # the lease still holds: send; report them later
            return messages, []
        duplicates = [m for m in messages if m.send_keys and set(m.send_keys) <= sent]
        return [m for m in messages if m not in duplicates], duplicates

    def _take(self, keys):
        """Take the keys for this instance; the ones sent within duplicate_window."""
        window = self.settings.duplicate_window
        with self._session() as run:
            run(C_TAKE, [(key, self.me) for key in keys], many=True)
            rows = run(_in(C_SEND_KEYS_OF, keys), keys)
            sent, retake = set(), []
            for key, owner, sent_at, age in rows:
                if sent_at is not None and age < window:
                    sent.add(key)
                elif owner != self.me or sent_at is not None:   # another's, or sent long ago
                    retake.append((self.me, key, window))
            if retake:
                run(C_RETAKE, retake, many=True)
        return sent

    def sent(self, keys):
        """DingTalk took these notifications."""
        if not keys:
            return
        if self.role != ALONE:
            try:
                with self._session() as run:
                    run(C_SENT, [(key,) for key in keys], many=True)
                return
            except StoreUnavailable:
                pass
        dropped = len(self._unreported) + len(keys) - self.UNREPORTED_KEPT
        if dropped > 0:
            self.metrics.inc("alertbridge_cluster_unreported_dropped_total", dropped)
        self._unreported = (self._unreported + list(keys))[-self.UNREPORTED_KEPT:]

    def sent_among(self, keys):
        """Which of these send keys some instance has sent (none known without MySQL)."""
        if self.role == ALONE:
            return set()
        try:
            with self._session() as run:
                return {row[0] for row in run(_in(C_SENT_AMONG, keys), keys)}
        except StoreUnavailable:
            return set()

    def record(self, robot, result):
        """Log a request to DingTalk for the budgets the cluster shares."""
        if self.role == ALONE:
            self.metrics.inc("alertbridge_cluster_uncoordinated_sends_total")
            return
        with contextlib.suppress(StoreUnavailable):
            with self._session() as run:
                run(C_SEND_ADD, (robot.key, result.errcode))

    # the lease
    def sleep_for(self):
        return max(0.2, self.settings.lease / 3)

    def backlog(self):
        return 0

    def step(self):
        started = self.clock()
        try:
            with self._session() as run:
                leading = self._check_in(run)
                self._report_unreported(run)
        except StoreUnavailable as exc:
            self._without_mysql(exc)
            return False
        if leading:
            self._lease_until = lease_end(started, self.settings.lease)
            if self.role != LEADER:
                self._take_over()
            self._lead()
        else:
            self._set_role(role_after(self.role, False, 0.0, self.settings.lease, 0.0))
            self._stand_by()
        return False

    def _check_in(self, run):
        """Check in as a member, then take or keep the lease; whether this instance leads."""
        lease = self.settings.lease
        run(C_CHECK_IN, (self.me, self.incarnation, socket.gethostname()[:255], os.getpid(),
                         lease, lease, lease))
        [(incarnation, host, pid)] = run(C_MEMBER_OF, (self.me,))
        if incarnation != self.incarnation:
            self._namesake(host, pid)
            return False
        self.conflict = None
        run(C_LEADER_ROW)
        leading = run(C_LEAD, (self.me, self.settings.lease, self.me), count=True) == 1
        alive = [r[0] for r in run(C_MEMBERS_ALIVE, (self.me, self.settings.lease))]
        self._count_missing(alive)
        return leading

    def _count_missing(self, alive):
        missing, self._missing_since = missing_after(
            self.settings.instances, len(alive), self._missing_since, self.clock(),
            self.settings.presumed_alone)
        if missing != self.missing:
            log.warning("cluster: %d of the other %d instances not checking in (alive: %s)%s",
                        missing, self.settings.instances - 1, ",".join(alive) or "none",
                        ": presumed to send alone, the leader keeps to its share of each budget"
                        if missing else "")
        self.missing = missing

    def _namesake(self, host, pid):
        if self.conflict != (host, pid):
            log.error("cluster: another process checks in as instance=%s (pid %s on %s): this "
                      "one stays out of the lease until it stops; give each instance its own "
                      "[cluster] instance", self.me, pid, logfmt(host))
        self.conflict = (host, pid)

    def _set_role(self, role):
        if role == self.role:
            return
        level = logging.WARNING if ALONE in (role, self.role) else logging.INFO
        log.log(level, "cluster: instance=%s is %s (was %s)%s", self.me, role, self.role,
                " without MySQL: each robot's budget divided by instances, duplicates possible"
                if role == ALONE else "")
        self.role = role
        self.role_changed.notify(role)

    def _take_over(self):
        """Lead: start from the budgets and throttles the whole cluster has used (and, coming
        back from ALONE, from this instance's own sends of that time, which MySQL missed)."""
        delivery = self.delivery()
        with self._session() as run:
            rows = run(C_SENDS_SINCE, (max(self.window(), delivery.throttle_seconds),))
        now = self.journal.clock()
        self.pool.restore([(key, now + ago, errcode) for key, ago, errcode in rows], now,
                          forget=self.role == STANDBY)   # a standby sent nothing of late
        self._registered = 0                # register again what this journal holds
        self._set_role(LEADER)

    def _lead(self):
        """The leader's turn: tell the cluster what it holds; take what standbys handed it."""
        registered = self.journal.send_keys_since(self._registered, self.REGISTER_BATCH)
        keys = [(key, self.me) for _, send_keys in registered for key in send_keys]
        with self._session() as run:
            if keys:
                run(C_TAKE, keys, many=True)
            handed = run(C_HANDED, (self.HANDOFF_BATCH,))
        if registered:
            self._registered = registered[-1][0]
        for row_id, route, request_id, body, packed, priority, level, send_keys, age in handed:
            send_keys = send_keys.split()
            if not (send_keys and all(self.journal.holds_send_key(key) for key in send_keys)):
                self.journal.adopt(route, request_id, body, packed, priority, level, send_keys, age)
                log.info("cluster: adopted a message of route=%s request_id=%s a standby "
                         "handed over", route, request_id)
            with self._session() as run:
                run(C_ADOPTED, (row_id,))
        self._purge()

    def _stand_by(self):
        """A standby's turn: drop copies of what the leader sent; hand the leader what only
        this instance has (its send keys unknown to the cluster a lease after it came)."""
        self._drop_copies_sent()
        older_than = self.journal.clock() - self.settings.lease
        unseen = self.journal.unseen(self._offered, older_than, self.HANDOFF_BATCH)
        if not unseen:
            return
        keys = sorted({key for row in unseen for key in row[7]})
        with self._session() as run:
            known = {r[0] for r in run(_in(C_SEND_KEYS_KNOWN, keys), keys)} if keys else set()
        handed = [row for row in unseen if not (row[7] and set(row[7]) <= known)]
        if handed:
            with self._session() as run:
                run(C_HAND_OFF, [(self.me, route, rid, body, packed, priority, level,
                                  " ".join(send_keys), age)
                                 for _, route, rid, body, packed, priority, level, send_keys, age
                                 in handed], many=True)
            self.journal.finish([row[0] for row in handed], "handed off")
            self.metrics.inc("alertbridge_cluster_handoffs_total", len(handed))
            log.warning("cluster: %d messages only this standby had were handed to the leader "
                        "(message=%s)", len(handed), ",".join(str(r[0]) for r in handed[:10]))
        self._offered = unseen[-1][0]

    def _without_mysql(self, exc):
        quiet = self.clock() - self._contact
        role = role_after(self.role, None, quiet, self.settings.lease, self.window())
        if role != self.role:
            log.warning("cluster: MySQL unreachable for %.0fs (%s)", quiet, exc)
            self._set_role(role)

    def _report_unreported(self, run):
        if self.role == ALONE:             # MySQL is back: the lease decides again
            self._sharing_until = self.clock() + self.window()
        if self._unreported:
            keys, self._unreported = self._unreported, []
            run(C_SENT_LATE, [(key, self.me) for key in keys], many=True)

    def _drop_copies_sent(self):
        """A standby's copies of notifications the leader has sent: finished as duplicates."""
        pending = self.journal.pending_send_keys()
        keys = sorted({key for _, send_keys in pending for key in send_keys})
        if not keys:
            return
        with self._session() as run:
            sent = {row[0] for row in run(_in(C_SENT_AMONG, keys), keys)}
        done = [message_id for message_id, keys in pending if keys and set(keys) <= sent]
        if done:
            self.journal.finish(done, "duplicate")
            self.metrics.inc("alertbridge_duplicates_total", len(done))

    def _purge(self):
        now = self.clock()
        if self._last_purge is not None and now - self._last_purge < Recorder.PURGE_EVERY:
            return
        self._last_purge = now
        delivery, settings = self.delivery(), self.settings
        with self._session() as run:
            run(C_PURGE_SEND_KEYS, (max(settings.duplicate_window, delivery.max_age) + 3600,))
            run(C_PURGE_SENDS, (2 * max(self.window(), delivery.throttle_seconds),))
            run(C_PURGE_MEMBERS, (settings.presumed_alone + 86400,))

    @contextlib.contextmanager
    def _session(self):
        """run(statement, params, many=False, count=False) on the cluster's MySQL session (the
        Store's: errors that mean "not now" become StoreUnavailable). Each statement commits
        on its own: a transaction held open by a paused process would lock the lease row, or
        send keys, away from the instance taking over. run() returns the rows, or the count of
        rows changed."""
        with self._lock, self._store.transaction() as cursor:
            def run(statement, params=(), many=False, count=False):
                changed = (cursor.executemany if many else cursor.execute)(statement, params)
                return changed if count else cursor.fetchall()
            yield run
        self._contact = self.clock()

    def stop(self):
        super().stop()
        if self._lock.acquire(timeout=1.0):     # not while a statement runs: the process ends it
            try:
                with contextlib.suppress(Exception), self._store.transaction() as cursor:
                    cursor.execute(C_LEAVE, (self.me, self.incarnation))   # not presumed alone
                self._store.close()
            finally:
                self._lock.release()


def _in(statement, keys):
    """A statement with one %s per key in its {keys}."""
    return statement.format(keys=", ".join(["%s"] * len(keys)))


# =============================================================================================
# 14. Observability: metrics, sd_notify, the watchdog
# =============================================================================================

METRIC_HELP = {
    "alertbridge_webhooks_total": ("counter", "Webhook requests by HTTP status answered."),
    "alertbridge_alerts_accepted_total": ("counter", "Alerts accepted into the journal."),
    "alertbridge_alerts_recorded_total": ("counter", "Alerts written to the history store."),
    "alertbridge_record_failures_total": ("counter", "Journal events the history store refused."),
    "alertbridge_sends_total": ("counter", "Requests to robots by route, robot, its kind "
                                           "(dingtalk, feishu, wecom) and the platform's "
                                           "errcode (none: no answer)."),
    "alertbridge_robot_throttles_total": ("counter", "Requests a robot's platform throttled, "
                                                     "whatever its errcode, by route, robot and "
                                                     "kind."),
    "alertbridge_alerts_delivered_total": ("counter", "Alerts in messages a robot's platform "
                                                      "accepted."),
    "alertbridge_digests_total": ("counter", "Digest messages made by merging a backlog."),
    "alertbridge_escalations_total": ("counter", "Escalation steps sent, by the route of the "
                                                 "incident."),
    "alertbridge_time_to_acknowledge_seconds": ("histogram", "Time from a page to its claim, by "
                                                             "route and level."),
    "alertbridge_incidents_open": ("gauge", "Incidents open in the history, by state (open: "
                                            "nobody has claimed it; acknowledged)."),
    "alertbridge_app_requests_total": ("counter", "Calls to the DingTalk app's OpenAPI, by api "
                                                  "(token, gateway, card, ding) and outcome (ok, "
                                                  "refused, throttled, held, error)."),
    "alertbridge_app_stream_connected": ("gauge", "1 while this instance holds the app's Stream "
                                                  "connection to DingTalk (the leader does), "
                                                  "else 0; present while [app] is set."),
    "alertbridge_app_stream_disconnects_total": ("counter", "Ends of the app's Stream connection "
                                                            "and failed attempts to open it, by "
                                                            "reason (disconnect: the gateway "
                                                            "asked; dropped; half_open; "
                                                            "connect_failed); each is followed "
                                                            "by a reconnect."),
    "alertbridge_duplicates_total": ("counter", "Messages not sent: the cluster had sent the same "
                                                "notification (Alertmanager's retries, HA peers)."),
    "alertbridge_cluster_uncoordinated_sends_total": ("counter", "Requests sent without MySQL, "
                                                                 "when duplicates are possible."),
    "alertbridge_cluster_role": ("gauge", "1 for this instance's role in the cluster."),
    "alertbridge_cluster_missing_instances": ("gauge", "Instances of `instances` not checking in, "
                                                       "presumed to send alone: budgets shared."),
    "alertbridge_cluster_handoffs_total": ("counter", "Messages this standby handed to the "
                                                      "leader, which had not received them."),
    "alertbridge_cluster_unreported_dropped_total": ("counter", "Sent notifications not reported "
                                                               "to MySQL: more than 10,000 "
                                                               "while it was away."),
    "alertbridge_messages_expired_total": ("counter", "Messages no robot took within max_age."),
    "alertbridge_send_duration_seconds": ("histogram", "Robot request latency."),
    "alertbridge_delivery_seconds": ("histogram", "From a webhook's 200 to a robot's platform "
                                                  "taking its alerts, by priority level."),
    "alertbridge_queue_messages": ("gauge", "Messages waiting to be sent, by priority level."),
    "alertbridge_queue_oldest_seconds": ("gauge", "Age of the oldest message waiting, by level."),
    "alertbridge_record_backlog_events": ("gauge", "Journal events not yet in the history store."),
    "alertbridge_robot_budget_remaining": ("gauge", "Messages the robot may still send now, by "
                                                    "robot and kind."),
    "alertbridge_robot_throttled": ("gauge", "1 while its platform throttles the robot."),
    "alertbridge_robot_disabled": ("gauge", "1 while a config error (its platform refused it, a "
                                            "placeholder token) keeps the robot out."),
    "alertbridge_store_up": ("gauge", "1 if the history store answered last time."),
    "alertbridge_journal_writable": ("gauge", "0 while journal writes fail (webhooks get 503)."),
    "alertbridge_http_requests_in_flight": ("gauge", "HTTP requests being handled, this one too."),
    "alertbridge_build_info": ("gauge", "Version of alertbridge."),
}
COUNTERS_AT_START = ("alertbridge_alerts_accepted_total", "alertbridge_alerts_recorded_total",
                     "alertbridge_record_failures_total", "alertbridge_duplicates_total")
ROUTE_COUNTERS = ("alertbridge_messages_expired_total", "alertbridge_alerts_delivered_total",
                  "alertbridge_digests_total", "alertbridge_escalations_total")
BUCKETS = {  # the histograms, and the upper bounds of their buckets in seconds
    "alertbridge_send_duration_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    "alertbridge_delivery_seconds": (1, 3, 10, 30, 60, 120, 300, 600, 1800, 3600),
    "alertbridge_time_to_acknowledge_seconds": (30, 60, 120, 300, 600, 900, 1800, 3600, 7200),
}


def _labels(labels):
    if not labels:
        return ""

    def escape(value):  # the exposition format's label value escapes: backslash, quote, newline
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in sorted(labels)) + "}"


class Metrics:
    """Counters and histograms in the Prometheus text format, standard library only."""

    def __init__(self):
        self._lock = threading.Lock()       # both dicts; held for arithmetic only
        self._values = {}           # (name, labels) -> counter value
        self._histograms = {}       # (name, labels) -> [count per bucket..., sum, count]

    def inc(self, name, value=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def set(self, name, value, **labels):
        """A gauge a worker keeps (the others are read at scrape time, see Probes)."""
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def declare(self, name, **labels):
        """A counter's series at 0 until it counts: a series that first appears at 1 has not
        increased, to Prometheus, and a rule on increase() would miss the first event."""
        self.inc(name, 0, **labels)

    def observe(self, name, seconds, **labels):
        bounds = BUCKETS[name]
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            counts = self._histograms.setdefault(key, [0] * (len(bounds) + 2))
            for i, bound in enumerate(bounds):
                counts[i] += seconds <= bound
            counts[-2] += seconds
            counts[-1] += 1

    def render(self, gauges):
        """`gauges`: list of (name, labels dict, value) read at scrape time."""
        with self._lock:
            samples = [(name, labels, value) for (name, labels), value in self._values.items()]
            histograms = {key: list(counts) for key, counts in self._histograms.items()}
        samples += [(name, tuple(sorted(labels.items())), value) for name, labels, value in gauges]
        lines = []
        for name, (kind, text) in METRIC_HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                for (n, labels), counts in sorted(histograms.items()):
                    if n == name:
                        lines += self._histogram_lines(name, labels, counts)
                continue
            lines += [f"{name}{_labels(labels)} {value}"
                      for n, labels, value in sorted(samples) if n == name]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram_lines(name, labels, counts):
        lines = [f"{name}_bucket{_labels(labels + (('le', str(bound)),))} {n}"
                 for bound, n in zip(BUCKETS[name], counts)]
        return lines + [f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {counts[-1]}",
                        f"{name}_sum{_labels(labels)} {counts[-2]}",
                        f"{name}_count{_labels(labels)} {counts[-1]}"]


def sd_notify(*fields):
    """Tell systemd about our state (Type=notify), only when it asked via NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), address)
        return True
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False


def watchdog_interval():
    """Half of systemd's WatchdogSec, if the watchdog is on for this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class SendAccounting:
    """Listens to every sender's `sent`: the log line and the metrics of each request."""

    NOTES = {MISCONFIGURED: " robot disabled until the config is reloaded",
             THROTTLED: " robot throttled by its platform"}

    def __init__(self, metrics):
        self.metrics = metrics

    def __call__(self, sent):
        result, message, robot = sent.result, sent.message, sent.robot
        level = {SENT: logging.INFO, MISCONFIGURED: logging.ERROR}.get(result.outcome,
                                                                      logging.WARNING)
        fix = CHANNELS[robot.kind].fix(result.errcode, result.errmsg, robot.name)
        log.log(level, "send message=%d route=%s priority=%s robot=%s request_id=%s alerts=%d "
                "errcode=%s errmsg=%s latency_ms=%d%s", message.id, sent.route, message.level,
                robot.name, message.request_id, len(message.alerts), result.errcode,
                logfmt(result.errmsg), result.latency * 1000, self.NOTES.get(result.outcome, "")
                + (f"; fix: {fix}" if fix else ""))
        errcode = "none" if result.errcode is None else str(result.errcode)
        self.metrics.inc("alertbridge_sends_total", receiver=sent.route, robot=robot.name,
                         kind=robot.kind, errcode=errcode)
        if result.outcome == THROTTLED:
            self.metrics.inc("alertbridge_robot_throttles_total", receiver=sent.route,
                             robot=robot.name, kind=robot.kind)
        self.metrics.observe("alertbridge_send_duration_seconds", result.latency)
        if result.ok:
            self.metrics.inc("alertbridge_alerts_delivered_total", len(message.alerts),
                             receiver=sent.route)
            self.metrics.observe("alertbridge_delivery_seconds", sent.at - message.created_at,
                                 priority=message.level)


class Probes:
    """What /-/ready and /metrics say of one instance, read when they are asked. The history's
    state comes by the recorder's `store_changed` (store_changed() is its listener);
    `app_state()` is the DingTalk app's (Bridge.app_state)."""

    def __init__(self, config, journal, pool, cluster, metrics, requests, clock, app_state):
        self.config, self.journal, self.pool, self.cluster = config, journal, pool, cluster
        self.metrics, self.requests, self.clock = metrics, requests, clock
        self.app_state = app_state
        self.store_ok, self.store_denied = None, False

    def store_changed(self, ok, denied):
        self.store_ok, self.store_denied = ok, denied

    def store_state(self):
        if self.store_ok is not False:
            return "ok"
        if self.store_denied:
            return ("access denied: a privilege is missing, see the log (alerts wait in the "
                    "journal; paging continues)")
        return "unreachable (alerts wait in the journal; paging continues)"

    def readiness(self):
        journal_ok = self.journal.writable()
        return journal_ok, {"journal": "ok" if journal_ok else "not writable",
                            "store": self.store_state()}

    def render_metrics(self):
        config, now = self.config(), self.clock()
        _, _, backlog, _ = self.journal.backlog()
        waiting = {level: (0, None) for route in config.routes.values()
                   for level in route.priority_order + (NO_LEVEL,)}
        waiting.update({level: (n, oldest) for level, n, oldest in self.journal.waiting_by_level()})
        gauges = [("alertbridge_record_backlog_events", {}, backlog),
                  ("alertbridge_store_up", {}, 1 if self.store_ok is not False else 0),
                  ("alertbridge_journal_writable", {}, int(self.journal.failed_at is None)),
                  ("alertbridge_http_requests_in_flight", {}, self.requests.count),
                  ("alertbridge_build_info", {"version": VERSION}, 1)]
        if config.cluster.enabled:
            gauges += [("alertbridge_cluster_role", {"role": role}, int(self.cluster.role == role))
                       for role in (LEADER, STANDBY, ALONE)]
            gauges += [("alertbridge_cluster_missing_instances", {}, self.cluster.missing)]
        if config.app.enabled:      # 0 from the start: a connection never made is alerted on
            gauges += [("alertbridge_app_stream_connected", {},
                        int(self.app_state()["connected_at"] is not None))]
        for level, (n, oldest) in sorted(waiting.items()):
            gauges += [("alertbridge_queue_messages", {"priority": level}, n),
                       ("alertbridge_queue_oldest_seconds", {"priority": level},
                        round(now - oldest, 3) if oldest else 0)]
        for robot in self.pool.report(config.robots, now):
            labels = {"robot": robot.name, "kind": robot.kind}
            gauges += [("alertbridge_robot_budget_remaining", labels, robot.budget),
                       ("alertbridge_robot_throttled", labels, int(robot.throttled(now))),
                       ("alertbridge_robot_disabled", labels,
                        int(bool(robot.disabled or robot.placeholder)))]
        return self.metrics.render(gauges)


def declare_series(metrics, config):
    """Every counter the shipped rules watch, at 0 for every route and robot from the start (and
    for new ones on reload): a series that first appears at 1 has not increased, to Prometheus."""
    for name in COUNTERS_AT_START:
        metrics.declare(name)
    for route in config.routes.values():
        for name in ROUTE_COUNTERS:
            metrics.declare(name, receiver=route.name)
        for robot in route.robots:
            for errcode in CHANNELS[robot.kind].DECLARED:
                metrics.declare("alertbridge_sends_total", receiver=route.name,
                                robot=robot.name, kind=robot.kind, errcode=errcode)
            metrics.declare("alertbridge_robot_throttles_total", receiver=route.name,
                            robot=robot.name, kind=robot.kind)
    if config.app.enabled:
        for api in ("token", "card"):
            for outcome in ("refused", "error"):
                metrics.declare("alertbridge_app_requests_total", api=api, outcome=outcome)
        for reason in StreamClient.REASONS:
            metrics.declare("alertbridge_app_stream_disconnects_total", reason=reason)


# =============================================================================================
# 15. Pages: the status page, the preview, the dry run
# =============================================================================================
# HTML made here and nowhere else. Every label, annotation and name is text from outside: each
# goes through esc() (or markdown_html(), which escapes first), and the Content-Security-Policy
# lets no script run at all. Nothing is loaded from elsewhere: it must work with no internet.

PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
PAGE_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;margin:0;
background:#f4f5f7;color:#1f2329}
header{background:#1f2329;color:#fff;padding:10px 16px}header a{color:#9cc3ff;margin-right:12px}
main{max-width:1100px;margin:0 auto;padding:8px}
section{background:#fff;border-radius:8px;margin:10px 0;padding:10px 14px;
box-shadow:0 1px 2px #0002}
h1{font-size:18px;margin:0}h2{font-size:16px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top;
overflow-wrap:break-word}
th{color:#646a73;font-weight:600;white-space:nowrap}
.t,.w{white-space:nowrap}.overview td{overflow-wrap:anywhere}
.attention{border-left:4px solid #c62828}.attention li{margin:4px 0}
@media (max-width:700px){
.rows table,.rows tbody,.rows tr,.rows td{display:block;width:auto}
.rows tr:first-child{display:none}.rows tr{border-bottom:1px solid #dee0e3;padding:4px 0}
.rows td{border:0;padding:1px 4px}
.rows td::before{content:attr(data-label) ": ";color:#646a73}
.rows td:first-child{font-weight:600}.rows td:first-child::before{content:none}
main{padding:4px}section{padding:8px 10px}}
.ok{color:#1a7f37}.bad{color:#c62828;font-weight:600}.warn{color:#b26a00}.dim{color:#8f959e}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;margin:2px;background:#eef0f3}
textarea{width:100%;box-sizing:border-box;font:12px monospace}
select,button{font-size:14px;padding:4px 8px}#claim,#person{font-size:18px;padding:8px 16px}
pre{white-space:pre-wrap;word-break:break-all;background:#f6f8fa;padding:8px;font-size:12px}
.dingtalk{border:1px solid #dee0e3;border-radius:8px;padding:8px 12px;max-width:560px;
background:#fff}.dingtalk blockquote{border-left:3px solid #ccc;margin:4px 0;padding-left:8px}
.dingtalk ul,.dingtalk ol{margin:2px 0;padding-left:22px}.dingtalk p{margin:6px 0}
.buttons a{display:inline-block;border:1px solid #dee0e3;border-radius:6px;padding:4px 10px;
margin:2px 4px 2px 0;text-decoration:none}
.dingtalk h1,.dingtalk h2,.dingtalk h3,.dingtalk h4,.dingtalk h5,.dingtalk h6{margin:6px 0}
.problem{background:#fff4e5;border-left:4px solid #b26a00;padding:6px 10px;margin:6px 0}
"""
PAGE_SENDS = 50         # the last sends on the status page
PAGE_FIRING = 50        # the newest firing alerts on the status page


def esc(value):
    return html.escape(str(value), quote=True)


def page(title, body, refresh=None, nav=True):
    """A whole HTML page; `refresh`: seconds until the browser reloads it; `nav`: the links
    to the other pages (not on the incident page, which phones open without credentials)."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    links = ('<nav><a href="/status">status</a><a href="/preview">preview</a>'
             '<a href="/metrics">metrics</a><a href="/-/ready">ready</a></nav>' if nav else "")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{PAGE_STYLE}</style></head><body>'
            f'<header><h1>{esc(title)}</h1>{links}</header><main>{body}</main></body></html>')


def span(css, text):
    return f'<span class="{css}">{esc(text)}</span>'


def table(headers, rows, empty="none"):
    """`rows`: lists of cells already made HTML (a cell may be (html, css class))."""
    if not rows:
        return f'<p class="dim">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c, h) for c, h in zip(row, headers)) + "</tr>"
                   for row in rows)
    return f'<div class="rows"><table><tr>{head}</tr>{body}</table></div>'


def _cell(cell, header):
    """A cell, labelled with its column: on a phone, each row is a card of `header: value`."""
    content, css = cell if isinstance(cell, tuple) else (cell, "")
    css = f' class="{css}"' if css else ""
    return f'<td data-label="{esc(header)}"{css}>{content}</td>'


def when(text):
    """A time that never breaks across lines."""
    return f'<span class="t">{esc(text)}</span>' if text else ""


def word(text):
    """A word that never breaks across lines (a level: critical)."""
    return f'<span class="w">{esc(text)}</span>' if text else ""


_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]*)\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_ITALIC = re.compile(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])")
_MD_FONT = re.compile(r"&lt;font color=(?:&quot;|&#x27;)?(#[0-9a-fA-F]{3,6})(?:&quot;|&#x27;)?&gt;"
                      r"(.*?)&lt;/font&gt;")
_MD_KEPT = re.compile("\x00([0-9]+)\x00")
_MD_ESCAPE = re.compile(r"\\([\\`*_\[\]~#>+-])")


def _md_inline(escaped):
    """Inline markup over text already escaped. Links (to http(s) and dingtalk: only) and
    images (as their alt text: the page loads nothing from elsewhere) are set aside first, so
    that no other markup reaches inside an attribute."""
    kept = []

    def keep(html_text):
        kept.append(html_text)
        return f"\x00{len(kept) - 1}\x00"

    def link(match):
        label, url = match.groups()
        if not re.match(r"(https?|dingtalk)://", url, re.I):
            return match.group(0)
        return keep(f'<a href="{url}" rel="noopener noreferrer" target="_blank">{label}</a>')
    text = escaped.replace("\x00", "")
    text = _MD_ESCAPE.sub(lambda m: keep(m.group(1)), text)      # \* is a star, not emphasis
    text = _MD_IMAGE.sub(lambda m: keep(f'<span class="dim">[image {m.group(1)}]</span>'), text)
    text = _MD_LINK.sub(link, text)
    text = _MD_FONT.sub(r'<span style="color:\1">\2</span>', text)
    text = _MD_BOLD.sub(r"<strong>\1</strong>", text)
    text = _MD_ITALIC.sub(r"<em>\1</em>", text)
    return _MD_KEPT.sub(lambda m: kept[int(m.group(1))], text)


def markdown_html(text):
    """DingTalk's markdown (headings, quotes, lists, bold, italic, links, rules, <font color>)
    as HTML that looks about as the group will see it. Everything is escaped first."""
    out, paragraph = [], []

    def flush():
        if paragraph:
            out.append("<p>" + "<br>".join(paragraph) + "</p>")
            paragraph.clear()
    for line in text.split("\n"):
        stripped = line.strip()
        escaped = _md_inline(esc(stripped))
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if not stripped:
            flush()
        elif re.fullmatch(r"(-\s*){3,}|(\*\s*){3,}", stripped):
            flush()
            out.append("<hr>")
        elif heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_md_inline(esc(heading.group(2)))}</h{level}>")
        elif stripped.startswith(">"):
            flush()
            out.append(f"<blockquote>{_md_inline(esc(stripped[1:].strip()))}</blockquote>")
        elif re.match(r"[-*+]\s", stripped):
            flush()
            out.append(f"<ul><li>{_md_inline(esc(stripped[2:]))}</li></ul>")
        elif re.match(r"\d+\.\s", stripped):
            flush()
            number, rest = stripped.split(".", 1)
            out.append(f'<ol start="{int(number)}"><li>{_md_inline(esc(rest.strip()))}</li></ol>')
        else:
            paragraph.append(escaped)
    flush()
    return "".join(out)


class StatusPage:
    """The status page of one instance (and /api/on-call), as HTML text: what it sends, what
    waits, its robots, the history, the cluster, the app. The HTTP side is IntakeHandler's;
    it sits behind [auth] like the webhooks. sent() listens to the senders (the last PAGE_SENDS
    requests, a deque: appends are atomic)."""

    REFRESH = 10        # seconds between the status page's reloads

    def __init__(self, config, journal, pool, store, probes, cluster, last_webhooks, clock, wall,
                 app_state=None):
        self.config, self.journal, self.pool, self.store = config, journal, pool, store
        self.probes, self.cluster, self.last_webhooks = probes, cluster, last_webhooks
        self.app_state = app_state      # () -> the DingTalk app's state (see Bridge.app_state)
        self.clock, self.wall = clock, wall
        self.recent_sends = collections.deque(maxlen=PAGE_SENDS)

    def sent(self, sent):
        result, message = sent.result, sent.message
        self.recent_sends.append({"at": sent.at, "route": sent.route, "level": message.level,
                                  "robot": sent.robot.name, "alerts": len(message.alerts),
                                  "errcode": result.errcode, "errmsg": result.errmsg,
                                  "latency_ms": int(result.latency * 1000)})

    def _time(self, epoch):
        """A time of the bridge's clock, as the wall clock shows it now."""
        if not epoch:
            return ""
        shown = epoch + self.wall() - self.clock()
        return datetime.fromtimestamp(shown, self.config().tz).strftime("%Y-%m-%d %H:%M:%S")

    def _ago(self, epoch, now):
        return f"{format_duration(now - epoch)} ago" if epoch else ""

    # the status page
    def status(self):
        config, now = self.config(), self.clock()
        queues = self.journal.queue_by_route()
        robots = {r.name: r for r in self.pool.report(config.robots, now)}
        parts = [self._attention(config, robots, now), self._summary(config, now, queues)]
        for name, route in sorted(config.routes.items()):
            parts.append(self._route(route, queues.get(name, ({}, 0)), robots, now))
        for name in sorted(set(queues) - set(config.routes)):
            parts.append(self._orphan(name, queues[name], now))
        parts += [self._app_section(config), self._on_call_section(),
                  self._open_incidents(config), self._sends(), self._firing()]
        return page(f"alertbridge {VERSION}", "".join(parts), refresh=self.REFRESH)

    def _app_section(self, config):
        """The DingTalk app: its Stream connection, its OpenAPI's throttling and last error."""
        if not config.app.enabled or self.app_state is None:
            return ""
        state = self.app_state()
        if state["connected_at"]:
            stream = span("ok", "connected") + f" since {when(self._shown(state['connected_at']))}"
        elif not state["leader"]:
            stream = "held by the cluster's leader"
        else:
            stream = span("bad", "not connected") + (f": {esc(state['stream_error'])}"
                                                     if state["stream_error"] else "")
        api = (span("bad", f"throttled by DingTalk for {state['throttled_for']:.0f} s more")
               if state["throttled_for"] > 0 else span("ok", "ok"))
        if state["api_error"]:
            api += (f" · last error {when(self._shown(state['api_error_at']))}: "
                    f"{esc(state['api_error'])}")
        groups = ", ".join(f"{esc(r.name)} → {esc(r.app_group)}"
                           for r in sorted(config.routes.values(), key=lambda r: r.name)
                           if r.app_group) or "none (set app_group on a receiver)"
        rows = [["Stream connection", stream], ["OpenAPI", api], ["cards for", groups]]
        return (f"<section><h2>DingTalk app {esc(config.app.client_id)}</h2>"
                + table(["part", "state"], rows) + "</section>")

    def on_call(self):
        """GET /api/oncall: who is on call now and next in each rotation, until when."""
        config = self.config()

        def shift(person, until, **since):
            return {"person": person.handle, "name": person.name, **since,
                    "until": datetime.fromtimestamp(until, config.tz).isoformat()}
        return {"rotations": [
            {"rotation": rotation.name, "now": shift(*now),
             "next": shift(*following, since=datetime.fromtimestamp(now[1], config.tz)
                           .isoformat())}
            for rotation, now, following in on_call_report(
                sorted(config.rotations.values(), key=lambda r: r.name), self.wall(),
                config.tz)]}

    def _on_call_section(self):
        config = self.config()
        if not config.rotations:
            return ""
        rows = [[esc(rotation.name), f"<strong>{esc(now[0].name)}</strong>",
                 when(self._shown(now[1])), esc(following[0].name)]
                for rotation, now, following in on_call_report(
                    sorted(config.rotations.values(), key=lambda r: r.name), self.wall(),
                    config.tz)]
        return ("<section><h2>On call</h2>" + table(["rotation", "now", "until", "next"], rows)
                + "</section>")

    OPEN_LISTED = 20
    # the open incidents' part, in the receivers' language (English if they differ)
    INCIDENT_WORDS = {
        "en": {"title": "Open incidents", "columns": ["#", "receiver", "incident", "opened",
                                                       "claimed", "next escalation step"],
               "none": "no incident is open", "nobody": "nobody yet",
               "by": "{name}, {at}", "silenced": "silenced until {until}",
               "stopped": "none: claimed", "over": "none left", "soon": "being scheduled",
               "step": "step {number} at {at}: {who}", "down": "the history did not answer"},
        "zh": {"title": "未结束的事件", "columns": ["#", "接收者", "事件", "开始", "认领",
                                                  "下一步升级"],
               "none": "没有未结束的事件", "nobody": "尚无人认领",
               "by": "{name}，{at}", "silenced": "静默至 {until}",
               "stopped": "无：已认领", "over": "没有了", "soon": "正在安排",
               "step": "第 {number} 步，{at}：{who}", "down": "历史库没有应答"},
    }

    def _open_incidents(self, config):
        """Each open incident: claimed or not, by whom and since when, and its next
        escalation step (when, and whom it @s)."""
        if not on_call_in_use(config):
            return ""
        language = language_of(config)
        words = self.INCIDENT_WORDS["zh" if language == "both" else language]
        try:
            if self.probes.store_ok is False:
                raise StoreUnavailable("the history store is unreachable")
            incidents = self.store.open_incidents(self.OPEN_LISTED)
        except (StoreUnavailable, StoreError) as exc:
            log.warning("status page: open incidents not read from the history: %s", exc)
            return f"<section><h2>{words['title']}</h2>{span('bad', words['down'])}</section>"
        rows = [[f"#{i['id']}", esc(i["route"]), esc(i["title"]),
                 when(self._db_time(i["opened_at"])), self._claimed(config, i, words),
                 self._next_step(config, i, words)] for i in incidents]
        return (f"<section><h2>{words['title']}</h2>"
                + table(words["columns"], rows, words["none"]) + "</section>")

    def _claimed(self, config, incident, words):
        if not incident["acknowledged_by"]:
            return span("bad", words["nobody"])
        return esc(words["by"].format(name=config.name_of(incident["acknowledged_by"]),
                                      at=self._db_time(incident["acknowledged_at"])))

    def _next_step(self, config, incident, words):
        route = config.routes.get(incident["route"])
        escalation = route.escalation if route else None
        if incident["state"] != "open":
            return esc(words["stopped"])
        if incident["silence_id"] and incident["silenced_until"]:
            return esc(words["silenced"].format(until=self._db_time(incident["silenced_until"])))
        if escalation is None or incident["next_step_at"] >= NEVER:
            return esc(words["over"])
        if incident["next_step_at"] <= LOOK_NOW:
            return esc(words["soon"])
        step = escalation.steps[incident["escalations"] % len(escalation.steps)]
        who = ", ".join(t.name if isinstance(t, Person) else f"rotation:{t.name}"
                        for t in step.people) + "".join(f" +{r}" for r in step.routes)
        return esc(words["step"].format(number=incident["escalations"] + 1, who=who.strip(),
                                        at=self._db_time(incident["next_step_at"])))

    def _shown(self, epoch):
        """A wall-clock epoch as the page shows times."""
        return datetime.fromtimestamp(epoch, self.config().tz).strftime("%Y-%m-%d %H:%M")

    def _attention(self, config, robots, now):
        """The robots that cannot send, and a leader without the app's Stream connection (card
        buttons do nothing), first on the page: what on-call opens it for."""
        items = []
        state = self.app_state() if config.app.enabled and self.app_state else None
        if state and state["leader"] and not state["connected_at"]:
            items.append("<li><strong>DingTalk app</strong>: " + span(
                "bad", "no Stream connection: buttons on cards do nothing")
                + (f" ({esc(state['stream_error'])})" if state["stream_error"] else "") + "</li>")
        for name, route in sorted(config.routes.items()):
            for robot in sorted((robots[r.name] for r in route.robots), key=self._trouble):
                problem = self._problem(robot, now)
                if problem:
                    items.append(f"<li><strong>{esc(robot.name)}</strong> (receiver "
                                 f"{esc(name)}): {problem}</li>")
        if not items:
            return ""
        return (f'<section class="attention"><h2>Needs attention</h2><ul>{"".join(items)}'
                f"</ul></section>")

    @staticmethod
    def _placeholder(robot):
        hint = CHANNELS[robot.kind].PLACEHOLDER_HINTS[robot.placeholder]
        return f"placeholder {robot.placeholder}: {hint}"

    def _problem(self, robot, now):
        """Why a robot cannot send now, as HTML; "" if it can."""
        if robot.placeholder:
            return span("bad", self._placeholder(robot))
        if robot.disabled:
            errcode, errmsg, since = robot.disabled
            return (span("bad", f"disabled, errcode {errcode}: {errmsg}")
                    + f" since {when(self._time(since))}; "
                    + esc(self._fix(robot) + ", then reload"))
        if robot.throttled(now):
            errcodes = [s["errcode"] for s in self.recent_sends
                        if s["robot"] == robot.name and s["errcode"]]
            said = f", errcode {errcodes[-1]}" if errcodes else ""
            return (span("bad", f"throttled by {CHANNELS[robot.kind].NAME}{said}")
                    + f" until {when(self._time(robot.throttled_until))}")
        return ""

    @staticmethod
    def _fix(robot):
        """What to do about a disabled robot, as its channel says (its errcode and errmsg)."""
        errcode, errmsg, _ = robot.disabled
        return CHANNELS[robot.kind].fix(errcode, errmsg, robot.name) or "fix the config"

    @staticmethod
    def _trouble(robot):
        """Sort key: disabled robots first, then throttled ones, then the others."""
        return (not (robot.placeholder or robot.disabled), robot.throttled_until == 0,
                robot.name)

    def _summary(self, config, now, queues):
        store_ok = self.probes.store_ok is not False
        _, _, backlog, oldest_event = self.journal.backlog()
        waiting = sum(n for levels, _ in queues.values() for n, _ in levels.values())
        expired = sum(e for _, e in queues.values())
        instance = esc(config.cluster.instance)
        if config.cluster.enabled:
            instance += f" · {esc(self.cluster.role)}"
        history = span("ok", "up") if store_ok else span("bad", "DOWN: alerts wait in the journal")
        history += f" · {esc(self.store.describe())} · backlog {backlog} events"
        if oldest_event:
            history += f" (oldest {self._ago(oldest_event, now)})"
        journal = (span("ok", "writable") if self.journal.failed_at is None
                   else span("bad", "NOT WRITABLE: webhooks get 503"))
        kept = self.journal.message_states()
        if kept:
            journal += span("dim", " · messages of the last day: " + ", ".join(
                f"{state} {n}" for state, n in sorted(kept.items())))
        queue = f"{waiting} messages waiting · " + (span("bad", f"{expired} expired") if expired
                                                    else "0 expired")
        clock = when(self._time(now)) + span("dim", f" ({config.service.timezone}, "
                                                   f"reloads every {self.REFRESH} s)")
        items = [("instance", instance), ("history", history), ("journal", journal),
                 ("queue", queue), ("now", clock)]
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in items)
        return f'<section><h2>Overview</h2><table class="overview">{rows}</table></section>'

    def _queue_line(self, levels, expired, now):
        if not levels:
            text = "nothing waiting"
        else:
            oldest = min(t for _, t in levels.values())
            counts = ", ".join(f"{esc(level)} {n}" for level, (n, _) in sorted(levels.items()))
            text = (f"<strong>{sum(n for n, _ in levels.values())} waiting</strong> ({counts}), "
                    f"oldest {self._ago(oldest, now)}")
        return text + (" · " + span("bad", f"{expired} expired") if expired else "")

    def _route(self, route, queue, robots, now):
        levels, expired = queue
        rows = [self._robot_row(robot, now)
                for robot in sorted((robots[r.name] for r in route.robots),
                                    key=lambda robot: (self._trouble(robot)[0],
                                                       not robot.throttled(now), robot.name))]
        line = self._queue_line(levels, expired, now)
        if levels:
            free = self.pool.next_slot_at(route, now, urgent=False)
            line += (" · " + span("bad", "no robot can send") if free is None else
                     f" · next free slot in {format_duration(free - now)}" if free > now else "")
        preview = (f'<a href="/preview?last={urllib.parse.quote(route.name)}">preview its last '
                   f'webhook</a>' if route.name in self.last_webhooks else "")
        return (f"<section><h2>receiver {esc(route.name)}</h2>"
                f"<p>{line} {preview}</p>"
                + table(["robot", "kind", "budget left now", "throttled", "disabled",
                         "last accepted send"], rows) + "</section>")

    def _robot_row(self, robot, now):
        budget = (f"{robot.budget} of {robot.capacity}"
                  + span("dim", f" ({robot.reserve} kept for urgent pages)"))
        throttled = ((f"until {when(self._time(robot.throttled_until))}", "bad")
                     if robot.throttled(now) else ("no", "ok"))
        if robot.placeholder:
            out = (esc(self._placeholder(robot)), "bad")
        elif robot.disabled:
            errcode, errmsg, since = robot.disabled
            out = (f"errcode {esc(errcode)}: {esc(errmsg)} (since {when(self._time(since))}; "
                   f"{esc(self._fix(robot))}, then reload)", "bad")
        else:
            out = ("no", "ok")
        last = robot.last_sent_at
        sent = (f"{when(self._time(last))} ({self._ago(last, now)})" if last
                else span("dim", "none since the start"))
        return [esc(robot.name), CHANNELS[robot.kind].NAME, budget, throttled, out, sent]

    def _orphan(self, name, queue, now):
        levels, expired = queue
        return (f"<section><h2>receiver {esc(name)} {span('bad', '(not in the config)')}"
                f"</h2><p>{self._queue_line(levels, expired, now)}: kept until "
                f"[receiver:{esc(name)}] is back (reload), or max_age.</p></section>")

    def _sends(self):
        rows = []
        for send in reversed(list(self.recent_sends)):
            ok = send["errcode"] == 0
            errcode = "no answer" if send["errcode"] is None else send["errcode"]
            rows.append([when(self._time(send["at"])), esc(send["route"]), word(send["level"]),
                         esc(send["robot"]), str(send["alerts"]),
                         (esc(errcode), "ok" if ok else "bad"), esc(send["errmsg"]),
                         str(send["latency_ms"])])
        return (f"<section><h2>Last {PAGE_SENDS} sends</h2>"
                + table(["time", "route", "level", "robot", "alerts", "errcode", "errmsg",
                         "ms"], rows, "no request to a robot since the start") + "</section>")

    def _firing(self):
        if self.probes.store_ok is False:
            return ("<section><h2>Firing now</h2><p class='bad'>the history store is unreachable"
                    "</p></section>")
        try:
            count, alerts = self.store.firing(PAGE_FIRING)
        except (StoreUnavailable, StoreError) as exc:
            log.warning("status page: firing alerts not read from the history: %s", exc)
            return ("<section><h2>Firing now</h2><p class='bad'>the history did not answer in "
                    "time</p></section>")
        rows = [[when(self._db_time(a["starts_at"])), esc(a["receiver"]), esc(a["alertname"]),
                 word(a["severity"]), esc(a["instance"]), esc(a["summary"] or "")]
                for a in alerts]
        shown = f", the newest {len(alerts)} shown" if count > len(alerts) else ""
        return (f"<section><h2>Firing now: {count}{shown}</h2>"
                + table(["since", "receiver", "alertname", "severity", "instance", "summary"],
                        rows, "nothing is firing") + "</section>")

    def _db_time(self, text):
        return shown_db_time(text, self.config().tz)


class IncidentPages:
    """What a Claim or Silence link opens: the incident, a form to confirm (GET never acts),
    and the claim or silence it makes (through the Desk), as HTML text."""

    # the incident page: what a Claim link opens
    CSRF_COOKIE, PERSON_COOKIE = "alertbridge_csrf", "alertbridge_person"

    def __init__(self, config, store, desk, wall):
        self.config, self.store, self.desk, self.wall = config, store, desk, wall

    def incident(self, token, cookies, form=None):
        """A Claim link: GET (`form` None) shows the incident and a form to confirm, and never
        acts (link previewers and scanners fetch links); POST, with the form's token matching
        its cookie (CSRF), claims it for the person chosen, remembered in a cookie. Returns
        (status, HTML, headers)."""
        config = self.config()
        language = language_of(config)
        if not config.oncall.link_secret:       # no secret, no link is anyone's
            return 404, self._incident_page(answer(language, "not_set_up"), language), ()
        try:
            route, group, action, _ = read_link(config.oncall.link_secret, token, self.wall())
        except LinkRefused as exc:
            return 403, self._incident_page("🚫 " + exc.say(language), language), ()
        language = language_of(config, route)
        try:
            if form is None:
                return self._incident_form(config, token, route, group, action, cookies)
            if not self._same_form(form, cookies):
                return 403, self._incident_page(answer(language, "stale_form"), language), ()
            if action == "silence":
                return self._silence(config, route, group, form)
            return self._claim(config, route, group, cookies, form)
        except (StoreUnavailable, StoreError) as exc:
            log.warning("incident page: the history did not answer: %s", exc)
            return 503, self._incident_page(answer(language, "history_down"), language), ()

    def _same_form(self, form, cookies):
        """Whether a POST comes from the form this page gave (its token matches the cookie)."""
        given = form.get("csrf", "")
        return bool(given) and hmac.compare_digest(given, cookies.get(self.CSRF_COOKIE, ""))

    def _incident_form(self, config, token, route, group, action, cookies):
        incident, language = self.store.open_incident(route, group), language_of(config, route)
        if action == "silence" and Desk.silenced_now(incident, self.wall()):
            said = answer(language, "silenced_already", silence=incident["silence_id"])
            return 200, self._incident_page(said, language), ()
        if incident is None or (action == "claim" and incident["state"] != "open"):
            state = self._incident_state(config, incident, route)
            return 200, self._incident_page(state, language), ()
        csrf = secrets.token_urlsafe(16)
        chosen = cookies.get(self.PERSON_COOKIE, "")
        if config.people:
            options = "".join(
                f'<option value="{esc(p.handle)}"{" selected" if p.handle == chosen else ""}>'
                f"{esc(p.name)}</option>" for p in sorted(config.people.values(),
                                                          key=lambda p: p.name))
            who = f'<select name="person" id="person">{options}</select>'
        else:
            who = f'<input name="person" id="person" maxlength="64" value="{esc(chosen)}">'
        body = (f"<section><h2>{esc(incident['title'])}</h2>"
                f"<p>{word(incident['level'])} · {answer(language, 'open_since')} "
                f"{when(self._db_time(incident['opened_at']))} · "
                f"{answer(language, 'receiver')} {esc(route)}</p>"
                f'<form method="post" action="/incident/{esc(token)}">'
                f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
                f"<p><label>{answer(language, 'i_am')} {who}</label></p>"
                f"{self._silenced_by(incident, language) if action == 'silence' else ''}"
                f"<p>{self._incident_buttons(config, action, language)}</p></form></section>")
        cookie = self._cookie(config, self.CSRF_COOKIE, csrf, "Strict", 3600)
        title = answer(language, "silence_page" if action == "silence" else "claim_page")
        return 200, page(title, body, nav=False), [("Set-Cookie", cookie)]

    @staticmethod
    def _silenced_by(incident, language):
        """What the silence will match, as Alertmanager will be given it (Desk.silence): every
        alert with these labels, whichever instance."""
        labels = sorted(incident["group_labels"].items())
        listed = "".join(f'<li><code>{esc(matchers({k: v})[1:-1])}</code></li>'
                         for k, v in labels)
        return (f'<p>{esc(answer(language, "silences_these"))}</p>'
                f'<ul class="matchers">{listed}</ul>')

    @staticmethod
    def _incident_buttons(config, action, language):
        if action == "claim":
            return f'<button type="submit" id="claim">{esc(WORDS[language]["claim"])}</button>'
        return " ".join(f'<button type="submit" name="hours" value="{h}" id="silence-{h}">'
                        f"{esc(answer(language, 'hours', hours=h))}</button>"
                        for h in Desk.hours_offered(config))

    def _chosen(self, config, form):
        """(handle or name, Person or None) of who the form says they are, or None if unfit."""
        chosen = form.get("person", "").strip()
        person = config.people.get(chosen)
        if (config.people and person is None) or not chosen or len(chosen) > 64:
            return None
        return chosen, person

    def _silence(self, config, route, group, form):
        """An Alertmanager silence on the incident's group labels, for the hours chosen,
        created by the person (see Desk.silence)."""
        who, hours = self._chosen(config, form), form.get("hours", "")
        language = language_of(config, route)
        if who is None or hours not in {str(h) for h in Desk.hours_offered(config)}:
            return 400, self._incident_page(answer(language, "choose_how_long"), language), ()
        chosen, person = who
        name = person.name if person else chosen
        try:
            _, silence = self.desk.silence(route, group, int(hours), chosen, name, "link")
        except DeskRefused as exc:
            return exc.status, self._incident_page(exc.say(language), language), ()
        said = answer(language, "silenced_for", hours=hours, silence=silence, name=name)
        return 200, self._incident_page(said, language), ()

    def _claim(self, config, route, group, cookies, form):
        who, language = self._chosen(config, form), language_of(config, route)
        if who is None:
            return 400, self._incident_page(answer(language, "choose_who"), language), ()
        chosen, person = who
        incident = self.desk.claim(route, group, chosen, person.name if person else chosen,
                                   "link")
        cookie = self._cookie(config, self.PERSON_COOKIE, urllib.parse.quote(chosen), "Lax",
                              31536000)
        state = self._incident_state(config, incident, route)
        return 200, self._incident_page(state, language), [("Set-Cookie", cookie)]

    @staticmethod
    def _cookie(config, name, value, same_site, max_age):
        """A Set-Cookie value for the incident pages, Secure when [oncall] base_url is https:
        the phones then reach them through TLS (a proxy's, perhaps) and the cookie must never
        travel without it."""
        secure = "; Secure" if config.oncall.base_url.lower().startswith("https://") else ""
        return (f"{name}={value}; Path=/incident/; HttpOnly; SameSite={same_site}; "
                f"Max-Age={max_age}{secure}")

    def _incident_state(self, config, incident, route):
        language = language_of(config, route)
        if incident is None:
            return answer(language, "nothing_open")
        return answer(language, "has_it", mark="✅ " if incident.get("claimed") else "",
                      name=config.name_of(incident["acknowledged_by"]),
                      since=self._db_time(incident["acknowledged_at"]),
                      taken=Desk.taken(incident))

    @staticmethod
    def _incident_page(text, language):
        return page(answer(language, "claim_page"), f"<section><p>{esc(text)}</p></section>",
                    nav=False)

    def _db_time(self, text):
        return shown_db_time(text, self.config().tz)


class Preview:
    """The preview: a payload (pasted, a route's last webhook, a sample) as each robot would
    get it, nothing sent; as HTML text."""

    def __init__(self, config, last_webhooks, renderer, channels, wall):
        self.config, self.last_webhooks = config, last_webhooks
        self.renderer, self.channels, self.wall = renderer, channels, wall

    # the preview
    def preview(self, form=None, last=None, sample=False):
        """The preview form and, for a payload, what each robot would get: nothing is sent.
        `form`: the submitted fields; `last`: a route whose last webhook to show; `sample`:
        show a sample webhook. Returns (HTTP status, HTML)."""
        config = self.config()
        form = dict(form or {})
        if last is not None:
            kept = self.last_webhooks.get(last)
            form = {"receiver": last, "payload": kept[1] if kept else ""}
        if sample:
            form = {"payload": json.dumps(sample_webhook(self.wall()), indent=1,
                                          ensure_ascii=False)}
        results, status = "", 200
        if form.get("payload", "").strip():
            try:
                results = self._results(form)
            except BadRequest as exc:
                status = 422
                results = f'<section><div class="problem">{esc(exc.reason)}</div></section>'
        options = ['<option value="">the receiver the payload names</option>'] + [
            f'<option value="{esc(n)}"{" selected" if n == form.get("receiver") else ""}>'
            f"{esc(n)}</option>" for n in sorted(config.routes)]
        lasts = " · ".join(f'<a href="/preview?last={urllib.parse.quote(n)}">{esc(n)}</a>'
                           for n in sorted(self.last_webhooks) if n in config.routes)
        load = ('<p>Load <a href="/preview?sample" id="sample">a sample webhook</a>'
                + (f" or the last webhook of receiver {lasts}" if lasts else "") + ".</p>")
        body = (f'<section><h2>Preview a message</h2><form method="post" action="/preview" '
                f'accept-charset="utf-8"><p>Paste an Alertmanager webhook (JSON, version 4), or '
                f'the alerts of its API (<code>GET /api/v2/alerts</code>, <code>amtool alert '
                f'query -o json</code>). Nothing is sent: this shows what each robot would get.'
                f'</p>{load}'
                f'<textarea name="payload" rows="12" id="payload">'
                f'{esc(form.get("payload", ""))}</textarea>'
                f'<p><label>receiver <select name="receiver" id="receiver">{"".join(options)}'
                f'</select></label></p><details><summary>try other templates (empty: the '
                f'receiver\'s own, from config.ini)</summary><p>title</p>'
                f'<textarea name="title" rows="2" id="title">{esc(form.get("title", ""))}'
                f'</textarea><p>alert</p><textarea name="alert" rows="10" id="alert">'
                f'{esc(form.get("alert", ""))}</textarea></details><p><button type="submit" '
                f'id="render">Preview (sends nothing)</button></p></form></section>{results}')
        return status, page("alertbridge preview", body)

    def _results(self, form):
        config = self.config()
        receiver = form.get("receiver") or None
        webhook = parse_webhook(webhook_of_api_alerts(form["payload"].encode(), receiver),
                                receiver)
        route = config.route_for(webhook.receiver)
        if route is None:
            raise BadRequest(404, f"unknown receiver {webhook.receiver[:60]!r} and no "
                                  f"default_receiver configured: this webhook would get 404")
        changed = {k: form[k].strip("\n") for k in ("title", "alert") if form.get(k, "").strip()}
        for key, text in changed.items():       # checked as config.ini's are
            errors = template_errors(text, TITLE_FIELDS if key == "title" else ALERT_FIELDS)
            if errors:
                raise BadRequest(422, f"{key} template: {'; '.join(errors)}")
        route = replace(route, **changed)
        renderer = self.renderer
        renderer.look_up_history(route, webhook.alerts, wait=1.0)
        own = [k for k in ("title", "alert") if k not in changed]
        out = [f"<section><h2>Receiver {esc(webhook.receiver)} → "
               f"[receiver:{esc(route.name)}], robots "
               f"{esc(', '.join(r.name for r in route.robots))} in turn</h2>"]
        out += [f"<details><summary>its {k} template, from config.ini</summary><pre>"
                f"{esc(getattr(route, k))}</pre></details>" for k in own]
        plan = dry_run(renderer, self.channels, route, webhook)
        if not plan:
            out.append("<p>The webhook has no alerts: nothing would be sent.</p>")
        out.append("</section>")
        for number, planned in enumerate(plan, 1):
            out.append(self._planned(route, f"{number} of {len(plan)}", *planned))
        return "".join(out)

    def _planned(self, route, number, level, alerts, bodies):
        who = self.renderer.mentions(route, alerts, self.wall(), self.config().tz)
        mentioned = " ".join(["@" + w for w in who.mobiles + who.user_ids]
                             + (["@all"] if who.all else []))
        separate = bool(bodies) and bodies[-1][0].kind == MENTION
        parts = len(bodies) - separate
        notes = [f"priority level <strong>{esc(level)}</strong>"
                 + (" (may use the robots' reserved slots)" if route.urgent(level) else ""),
                 f"{len(alerts)} alert{'' if len(alerts) == 1 else 's'}",
                 f"@-mentions: {esc(mentioned) if mentioned else 'nobody'}"
                 + (" (in a text message after the card: an actionCard cannot @)"
                    if separate else "")]
        if parts > 1:
            notes.append(f"too long for one message: sent as {parts} parts")
        notes.append(f"when more {esc(level)} messages wait than the robots may send, they are "
                     f"folded into one digest titled "
                     f"“{esc(digest_title(level, '…', route.language))}”")
        out = [f"<section><h2>Message {number}</h2><p>"
               + " · ".join(notes) + "</p>"]
        for part, (body, robots_and_requests) in enumerate(bodies, 1):
            for robots, request in _same_requests(robots_and_requests):
                channel = self.channels.of(robots[0])
                names, size, limit = [r.name for r in robots], channel.size(request), \
                    channel.limit()
                css = "ok" if size <= limit else "bad"
                label = (f"part {part} of {parts}, " if parts > 1 and part <= parts else
                         "the @ message, " if part > parts else "")
                shown = channel.shown(request)
                out.append(f"<h3>{esc(label)}{esc(shown.kind)} to robot "
                           f"{esc(', '.join(names))}: <span class='{css}'>"
                           f"{size:,} of {limit:,} bytes</span></h3>"
                           + _shown(shown, request))
        out.append("</section>")
        return "".join(out)


def shown_db_time(text, tz):
    """A time the history keeps (the wall clock's), as the pages show it."""
    return from_db_time(text).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if text else ""


def _shown(shown, request):
    """A request as the group sees it (a channel's Shown), then as JSON."""
    if not shown.markdown:
        view = f'<div class="dingtalk"><p>{esc(shown.text)}</p></div>'
    else:
        buttons = "".join(f'<a class="button" href="{esc(url)}" rel="noopener '
                          f'noreferrer" target="_blank">{esc(label)}</a>'
                          for label, url in shown.buttons)
        view = (f'<p class="dim">in the chat list: {esc(shown.title)}</p>'
                f'<div class="dingtalk">{markdown_html(shown.text)}'
                + (f'<p class="buttons">{buttons}</p>' if buttons else "") + "</div>")
    return (view + "<details><summary>the request body (JSON)</summary><pre>"
            f"{esc(json.dumps(request, ensure_ascii=False, indent=2))}</pre></details>")


def _same_requests(robots_and_requests):
    """[(robot, request)] -> [([robots], request)]: robots of a kind without a keyword get the
    same."""
    groups = []
    for robot, request in robots_and_requests:
        for robots, seen in groups:
            if seen == request and robots[0].kind == robot.kind:
                robots.append(robot)
                break
        else:
            groups.append(([robot], request))
    return groups


def dry_run(renderer, channels, route, webhook):
    """What the bridge sends for `webhook` when the robots have budget for it, planned as the
    senders plan it (Renderer.expand): one message per priority level, each as the bodies that
    go out, each with the request every robot of the route gets.
    [(level, alerts, [(body, [(robot, request), ...]), ...])]."""
    plan = []
    for (_, level), body in bodies_of(route, webhook):
        bodies = renderer.expand(route, body, channels)
        plan.append((level, list(body.alerts), [
            (each, [(robot, request_body(renderer, channels, route, each, robot))
                    for robot in route.robots]) for each in bodies]))
    return plan


# =============================================================================================
# 16. Bridge: one alertbridge instance
# =============================================================================================

class Bridge:
    """One alertbridge instance: it makes the components, gives each what it uses, and owns
    start, reload and stop; nothing else. Several can run in one process (the tests do): nothing
    here is global. `clock` (seconds since the epoch, steady: every duration and deadline),
    `wall` (what is stored and shown), `post` (one request; the channel's by default) and
    `channel` can be replaced, to run delivery in simulated time or through another channel.

    The components reach the running Config through `self.current` (a reload replaces it whole)
    and tell each other through Signals: a message journaled (Journal.new_messages), a request
    made (sent), the history up or down (Recorder.store_changed), a cluster role changed."""

    RESTART_ONLY = ("listen", "port", "max_connections", "state_dir", "journal", "journal_sync")
    SHUTDOWN_POLL = 0.1     # seconds the HTTP server may take to notice a stop

    def __init__(self, config, clock=None, wall=wall_time, post=None):
        self.config = config
        self.loaded_at = wall()         # when the running config was read: start, reload
        self.clock = clock or SteadyClock(wall)
        self.wall = wall
        current = self.current
        self.metrics = Metrics()
        declare_series(self.metrics, config)
        self.journal = Journal(config.service.journal, config.service.journal_sync, self.clock,
                               wall)
        self.journal.bring_forward(config.delivery.retry_max + config.delivery.timeout)
        self.store = StoreProcess(config.database)
        self.history = Recurrence(self.store)
        self.channels = Channels(current)
        self.post = post or self.channels.post
        self.renderer = Renderer(current, self.history, wall)
        self.pool = RobotPool(lambda: self.config.delivery, share=lambda: self.cluster.share(),
                              classify=lambda: classify(self.config.robots),
                              windows=lambda: self.config.budget_windows)
        self._restore_budgets()
        self.cluster = (Coordinator(config.cluster, lambda: self.config.delivery,
                                    config.database, self.journal, self.pool, self.metrics,
                                    window=lambda: self.config.longest_window)
                        if config.cluster.enabled else Solo())
        self.sent = Signal()            # a Sent, for every request a sender makes
        self.senders = Senders(self._sender)
        self.notifier = Notifier(current, self.journal, self.senders, self.metrics)
        self.recorder = Recorder(current, self.journal, self.store, self.metrics, self.clock,
                                 wall)
        self.app_api = AppAPI(current, self.metrics, self.clock, wall)
        self.relay = NoteRelay(current, self.store, self.journal, self.cluster, wall)
        self.escalator = Escalator(current, self.store, self.cluster, self.metrics, self.clock,
                                   wall, self.relay, ding=self.app_api.ding)
        self.follower = Follower(current, self.store, self.cluster, wall)
        self.app = AppPager(current, self.app_api, self.journal, self.renderer)
        self.desk = Desk(current, self.store, self.metrics, wall, self.app.tell)
        self.app_desk = AppDesk(current, self.desk, self.store, wall)
        self.stream = StreamClient(current, self.app_api, self.app_desk.handle, self.cluster)
        self.requests = Requests()
        self.probes = Probes(current, self.journal, self.pool, self.cluster, self.metrics,
                             self.requests, self.clock, self.app_state)
        self.intake = Intake(current, self.journal, self.metrics, {}, self.clock)
        self.status_page = StatusPage(current, self.journal, self.pool, self.store, self.probes,
                                      self.cluster, self.intake.last_webhooks, self.clock, wall,
                                      self.app_state)
        self.incidents = IncidentPages(current, self.store, self.desk, wall)
        self.preview = Preview(current, self.intake.last_webhooks, self.renderer, self.channels,
                               wall)
        self.journal.new_messages.listen(lambda name: self.senders.wake(name, Senders.GATHER))
        self.recorder.store_changed.listen(self.probes.store_changed)
        if config.cluster.enabled:
            self.cluster.role_changed.listen(self.notifier.wake)     # a leader sends: wake it
        self.sent.listen(SendAccounting(self.metrics))
        self.sent.listen(self.status_page.sent)
        self.server = None
        self._reload_lock = threading.Lock()
        self._stopped = threading.Event()

    def current(self):
        """The running Config: what every component reads, replaced whole by a reload."""
        return self.config

    def _sender(self, name):
        return RouteSender(name, self.current, self.journal, self.pool, self.renderer,
                           self.channels, self.cluster, self.metrics, self.clock, self.wall,
                           self.post, self.sent, (self.app,))

    def app_state(self):
        """What the status page shows of the DingTalk app."""
        return {"connected_at": self.stream.connected_at, "leader": self.cluster.may_send(),
                "stream_error": self.stream.last_error,
                "throttled_for": self.app_api.throttled_until - self.clock(),
                "api_error": self.app_api.last_error, "api_error_at": self.app_api.last_error_at}


    def _restore_budgets(self):
        """Budgets and throttles from the journal's send log; a row written before robot keys
        existed (0.3) is matched to the robot of that name."""
        now, delivery = self.clock(), self.config.delivery
        keys = {r.name: r.key for r in self.config.robots}
        sends = self.journal.recent_sends(now - self.config.send_log_span)
        self.pool.restore([(key or keys.get(name, name), at, errcode)
                           for name, key, at, errcode in sends], now)

    @property
    def address(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, fork_store=False):
        """Start serving. `fork_store`: this process has one thread yet (the daemon's run()),
        so the store process can be a fork of it (StoreProcess.fork_now)."""
        if fork_store:
            self.store.fork_now()
        service = self.config.service
        missing = DIALECTS[self.config.database.driver].missing_driver()
        if missing:     # paging never waits for the history: the journal keeps its events
            log.error("%s; alerts are paged, and the history waits in the journal", missing)
        endpoints = Endpoints(self.current, self.intake, self.status_page, self.incidents,
                              self.preview, self.probes, self.metrics, self.requests, self.reload,
                              self.send_test)
        handler = type("Handler", (IntakeHandler,), {"endpoints": endpoints})
        try:
            self.server = IntakeServer((service.listen, service.port), handler,
                                       service.max_connections)
        except OSError as exc:
            raise StartError(listen_problem(service, exc)) from exc
        self._warn_about_robots()
        for warning in unclaimable_escalations(self.config):
            log.warning("%s", warning)
        self.cluster.start()
        self.senders.start()
        self.notifier.start()
        self.recorder.start()
        self.escalator.start()
        self.follower.start()
        self.stream.start()
        threading.Thread(target=self.server.serve_forever, args=(self.SHUTDOWN_POLL,),
                         name="http", daemon=True).start()
        interval = watchdog_interval()
        if interval:
            threading.Thread(target=self._watchdog, args=(interval,), name="watchdog",
                             daemon=True).start()
        log.info("alertbridge %s listening on %s, journal %s, history %s, receivers %s", VERSION,
                 self.address, service.journal, self.store.describe(),
                 ",".join(sorted(self.config.routes)))
        sd_notify("READY=1", f"STATUS=listening on {self.address}")
        return self

    def _warn_about_robots(self):
        for warning in not_at_by_phone(self.config):
            log.warning("%s", warning)
        for robot in {r for r in self.config.robots if r.placeholder}:
            log.warning("robot=%s: %s: it is not used until configured", robot.name,
                        robot.placeholder_words)
        for names in shared_tokens(self.config):
            log.warning("robots %s have the same credential: they are one robot to their platform "
                        "and share one budget of %s", ", ".join(names),
                        budget_words(windows_of(robot_named(self.config, names[0]),
                                                self.config.delivery)))

    def _watchdog(self, interval):
        """Pet systemd's watchdog only while every worker thread is alive."""
        while not self._stopped.wait(interval):
            if all(w.is_alive() for w in (self.notifier, self.senders, self.recorder,
                                          self.escalator, self.follower, self.cluster,
                                          self.stream)):
                sd_notify("WATCHDOG=1")
            else:
                log.error("a worker thread died: not petting the watchdog, systemd will restart us")

    def stop(self, timeout=10.0):
        """Stop accepting, finish in-flight requests, record what can be recorded, return within
        about `timeout` seconds (systemd kills at 30). Messages not yet sent stay in the journal
        for the next start, and so do events the store could not take in time."""
        deadline = time.monotonic() + timeout

        def left(at_most=timeout):
            return max(0.0, min(at_most, deadline - time.monotonic()))
        sd_notify("STOPPING=1")
        self._stopped.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        self.requests.drain(left())
        self.cluster.stop()
        self.stream.stop()
        self.app_desk.stop()
        self.escalator.stop()
        self.follower.stop()
        self.notifier.stop()
        self.senders.stop()
        self.stream.join(left())
        self.escalator.join(left())
        self.follower.join(left(1.0))
        self.notifier.join(left())
        self.senders.join(left())
        if self.recorder.store_ok:
            self.recorder.wait_idle(left(5.0))
        self.recorder.stop()
        self.recorder.join(left())
        self.store.close(max(0.5, left()))
        if any(w.is_alive() for w in (self.notifier, self.senders, self.recorder,
                                      self.escalator, self.follower)):
            self.journal.unlock()       # a worker still holds on: its writes may still land
        else:
            self.journal.close()

    def reload(self):
        """Re-read config.ini; keep the running config if the new one is broken. Returns (ok,
        what to say, the keys it changed that only a restart applies)."""
        with self._reload_lock:
            try:
                config = load_config(self.config.path)
            except ConfigError as exc:
                for line in exc.lines:
                    log.error("reload rejected, keeping the running config: %s", line)
                return False, f"config rejected: {'; '.join(exc.lines)}", []
            config, changed = self._restart_only(config)
            sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            self.config, self.loaded_at = config, self.wall()
            apply_log_format(config.service.log_format)
            self.pool.forgive()
            declare_series(self.metrics, config)
            self._warn_about_robots()
            self.notifier.wake()
            log.info("config reloaded: receivers %s", ",".join(sorted(config.routes)))
            sd_notify("READY=1", "STATUS=config reloaded" + (
                f"; restart needed for {', '.join(changed)}" if changed else ""))
            return True, "reloaded", changed

    def _restart_only(self, config):
        """`config` with the running values of what only a restart applies, and which of those
        keys it changed (said in a WARNING)."""
        running = self.config.service
        changed = [f"[alertbridge] {k}" for k in self.RESTART_ONLY
                   if getattr(config.service, k) != getattr(running, k)]
        for section in ("database", "cluster"):
            old, new = getattr(self.config, section), getattr(config, section)
            changed += [f"[{section}] {f.name}" for f in fields(old)
                        if getattr(old, f.name) != getattr(new, f.name)]
        if not changed:
            return config, changed
        log.warning("reload: %s changed, which takes effect only on a restart "
                    "(systemctl restart alertbridge): running on as before meanwhile",
                    ", ".join(changed))
        kept = {k: getattr(running, k) for k in self.RESTART_ONLY}
        return replace(config, service=replace(config.service, **kept),
                       database=self.config.database, cluster=self.config.cluster), changed

    def send_test(self, route_name, fingerprint=""):
        """POST /-/send-test?receiver=NAME&route=FINGERPRINT (what --send-test asks a running
        daemon): the test message through each robot of the route, within the budgets this
        daemon keeps. A route that is not the asker's (Route.fingerprint) sends nothing: 409,
        "differs", and the asker sends through its own. Every answer says when the running
        config was loaded."""
        route = self.config.routes.get(route_name)
        loaded = {"config_loaded_at": self.loaded_at}
        if fingerprint and (route is None or route.fingerprint() != fingerprint):
            return 409, {"differs": True, **loaded,
                         "error": f"[receiver:{route_name[:60]}] of the running config is not "
                                  f"the one asked for"}
        if route is None:
            return 404, {"error": f"no [receiver:{route_name[:60]}] in the running config",
                         **loaded}
        if not self.cluster.may_send():
            return 409, {"error": f"this instance is a cluster's {self.cluster.role}: it does "
                                  f"not send; run --send-test on the leader", **loaded}

        def ledger(robot, result, at):
            send_id = self.journal.begin_send(robot.name, robot.key, at)
            test = types.SimpleNamespace(request_id="send-test", id=0, alerts=[])
            self.journal.end_send(send_id, robot.name, robot.key, at, result.errcode,
                                  send_event(route.name, robot, test, result, self.wall()))
            self.cluster.record(robot, result)
        lines, ok = send_test_messages(route, self.renderer, self.channels, self.pool, self.post,
                                       self.clock, self.config.delivery.timeout, ledger)
        card_lines, card_ok = self.app.send_test(route)
        lines, ok = lines + card_lines, ok and card_ok
        log.info("route=%s send-test: %s", route.name, logfmt("; ".join(lines)))
        return 200, {"ok": ok, "robots": lines, **loaded}


# =============================================================================================
# 17. Command line
# =============================================================================================

TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_HANDLER = "alertbridge"     # the name of the handler setup_logging() installs


class JsonLogFormatter(logging.Formatter):
    """log_format = json: one object per line for Loki, ELK and the like. The key=value fields
    of the text line (request_id, receiver, route, robot, errcode...) become keys of their own,
    as strings; the line itself is "message"."""

    FIELD = re.compile(r'(?<![^\s(])([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
    RESERVED = ("time", "level", "logger", "message", "exception")
    RENAMED = {"message": "message_id"}   # the journal's message id, not the line

    def format(self, record):
        message = record.getMessage()
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc)
                 .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname.lower(), "logger": record.name, "message": message}
        for key, value in self.FIELD.findall(message):
            key = self.RENAMED.get(key, key)
            if key not in self.RESERVED and key not in entry:
                entry[key] = self._value(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps leaves U+2028, U+2029 and C1 controls (NEL) raw: line breaks to some readers
        return _CONTROL_CHARACTERS.sub(lambda m: "\\u%04x" % ord(m.group()),
                                       json.dumps(entry, ensure_ascii=False))

    @staticmethod
    def _value(text):
        if text.startswith('"'):
            with contextlib.suppress(ValueError):
                return json.loads(text)
        return text.rstrip(":;,)")


def setup_logging(level, log_format="text"):
    handler = logging.StreamHandler(sys.stderr)
    handler.name = LOG_HANDLER
    logging.basicConfig(level=level.upper(), handlers=[handler])
    apply_log_format(log_format)


def apply_log_format(log_format):
    """Set the format of the handler setup_logging() installed: at start and on reload. Bridges
    in a process that did not call it (tests) leave logging alone."""
    formatter = (JsonLogFormatter() if log_format == "json"
                 else logging.Formatter(TEXT_LOG_FORMAT))
    for handler in logging.getLogger().handlers:
        if handler.name == LOG_HANDLER:
            handler.setFormatter(formatter)


def current_log_format():
    """What the store process is told to log as: the daemon's own format."""
    handlers = [h for h in logging.getLogger().handlers if h.name == LOG_HANDLER]
    return "json" if handlers and isinstance(handlers[0].formatter, JsonLogFormatter) else "text"


def check_config(config):
    """--check-config: a summary an operator can read, secrets masked."""
    service, db, delivery, auth = config.service, config.database, config.delivery, config.auth
    lines = [f"config {config.path}: OK",
             f"listen {service.listen}:{service.port}, journal {service.journal}",
             f"history {db.describe()}" + (" (password set)" if db.password else ""),
             f"delivery {delivery.rate_limit} msgs/{delivery.rate_window:g}s per robot, "
             f"max_age {delivery.max_age:g}s, retention {db.retention_days:g} days",
             f"auth {'bearer' if auth.bearer_token else ''}{' basic' if auth.username else ''}"
             if auth.enabled else "auth none (webhooks are open)",
             f"default receiver {service.default_receiver or '(none: unknown receivers get 404)'}"]
    for route in config.routes.values():
        mentions = [", @" + ",".join(route.at_mobiles) if route.at_mobiles else "",
                    ", @all" if route.at_all else "",
                    f" (for {', '.join(route.at_severities)} alerts)"
                    if route.at_severities and (route.at_mobiles or route.at_all) else ""]
        unit = "alert" if route.per_alert else "group"
        lines.append(f"receiver {route.name}: one message per {unit}" + "".join(mentions))
        for robot in route.robots:
            windows = config.robot_windows[robot.key]
            own = windows != ((delivery.rate_limit, delivery.rate_window),)
            notes = [n for n, on in ((robot.kind, robot.kind != DEFAULT_KIND),
                                     (f"{budget_words(windows)} per robot", own),
                                     ("signed", robot.secret),
                                     (f"keyword {robot.keyword!r}", robot.keyword),
                                     (f"PLACEHOLDER {robot.placeholder_key.upper()}: not used",
                                      robot.placeholder)) if on]
            lines.append(f"  robot {robot.name}: {CHANNELS[robot.kind].mask(robot.url)}"
                         + (f" ({', '.join(notes)})" if notes else ""))
    for names in shared_tokens(config):
        lines.append(f"note: robots {', '.join(names)} have the same credential: "
                     f"one budget between them")
    lines += [f"note: {warning}" for warning in unclaimable_escalations(config)]
    lines += [f"note: {warning}" for warning in not_at_by_phone(config)]
    if config.app.enabled:
        carded = ", ".join(r.name for r in config.routes.values() if r.app_group) or "none"
        lines.append(f"app {config.app.client_id} (secret set): cards for receivers {carded}, "
                     f"DING {config.app.ding}; --check-app tries the credentials with DingTalk")
        unreached = not_dinged(config) if config.app.ding != "none" else []
        if unreached:
            lines.append(f"note: escalation steps reach {', '.join(unreached)} without a "
                         f"user_id: DING cannot reach them (they are @-mentioned by mobile)")
    return "\n".join(lines)


def not_at_by_phone(config):
    """For each receiver with robots that cannot @ a phone number (Feishu's), who its pages
    would @ by phone number alone: a line each, for --check-config and the start's log."""
    lines = []
    for route in config.routes.values():
        for kind in sorted({r.kind for r in route.robots if not CHANNELS[r.kind].AT_BY_MOBILE}):
            channel = CHANNELS[kind]
            people = [p for p in config.people.values()
                      if pages_person(route, p) and not dict(p.ids).get(kind)]
            who = [p.handle for p in people] + list(route.at_mobiles)
            if who:
                lines.append(f"receiver {route.name}: {channel.NAME} robots cannot @ a phone "
                             f"number, so {', '.join(who)} would only be named: give people "
                             f"{channel.PERSON_KEY} (or at_user_ids = {kind}:ID)")
    return lines


def not_dinged(config):
    """The handles of the people escalation steps reach (themselves, or in a rotation) who have
    no user_id, so no DING."""
    found = set()
    for route in config.routes.values():
        for step in route.escalation.steps if route.escalation else ():
            for target in step.people:
                people = (target,) if isinstance(target, Person) else target.people
                found.update(p.handle for p in people if not p.user_id)
    return sorted(found)


def check_app(config, out=None):
    """--check-app: the [app] credentials tried with DingTalk: a token, and a Stream ticket
    (the secret is never printed). 0 if both came, 1 if not, 2 if there is no [app]."""
    app, out = config.app, out or sys.stdout
    if not app.enabled:
        print("no [app] client_id and client_secret: nothing to check", file=out)
        return 2
    api = AppAPI(lambda: config, Metrics())
    try:
        api.token()
        print(f"app {app.client_id}: token OK ({app.api_url})", file=out)
        api.open_stream((CARD_CALLBACK, BOT_MESSAGE))
        print(f"app {app.client_id}: Stream ticket OK", file=out)
    except AppError as exc:
        print(f"app {app.client_id}: NOT OK: {exc}", file=out)
        return 1
    carded = [r.name for r in config.routes.values() if r.app_group]
    receivers = ", ".join(carded) or "(none: set app_group)"
    print(f"app {app.client_id}: cards for receivers {receivers}", file=out)
    return 0


def preflight(config):
    """What --check-config can check of the host without starting: ([errors], [notes]). The
    port is bound for a moment; in use, it may be the running daemon's (a note, not an error)."""
    service, errors, notes = config.service, [], []
    problem = try_listen(service)
    if problem is not None and problem.errno == errno.EADDRINUSE:
        notes.append(f"port {service.port} is in use now (by this alertbridge, if it runs)")
    elif problem is not None:
        errors.append(listen_problem(service, problem))
    missing = DIALECTS[config.database.driver].missing_driver()
    if missing:
        errors.append(f"history: {missing}")
    elif config.database.driver == "mysql":
        refused, unreached = Store(config.database).check_login()
        errors, notes = errors + refused, notes + unreached
    files = [("journal", service.journal)]
    if config.database.driver == "sqlite":
        files.append(("history", config.database.path))
    for what, path in files:
        problem = writable_problem(path)
        if problem:
            errors.append(f"{what} {path}: {problem}")
    return errors, notes


def render_payload(config, path, out=sys.stdout, err=sys.stderr):
    """--render: the DingTalk request bodies a webhook (a file, or - for stdin) gives, one JSON
    per line on `out`, exactly as they would be sent; what each is on `err`. Nothing is sent.
    0: rendered; 2: a bad payload (templates were checked when the config loaded)."""
    try:
        with (open(0, "rb", closefd=False) if path == "-" else open(path, "rb")) as payload:
            webhook = parse_webhook(webhook_of_api_alerts(payload.read()))
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror}", file=err)
        return 2
    except BadRequest as exc:
        print(f"{path}: {exc.reason}", file=err)
        return 2
    route = config.route_for(webhook.receiver)
    if route is None:
        print(f"{path}: receiver {webhook.receiver!r} has no [receiver:NAME] section and there "
              f"is no default_receiver: the bridge would answer 404", file=err)
        return 2
    channels = Channels(lambda: config)
    plan = dry_run(Renderer(lambda: config), channels, route, webhook)
    for number, (level, _, bodies) in enumerate(plan, 1):
        for part, (_, robots_and_requests) in enumerate(bodies, 1):
            for robots, request in _same_requests(robots_and_requests):
                channel = channels.of(robots[0])
                encoded = channel.encode(request)
                print(encoded.decode(), file=out)
                print(f"# message {number}/{len(plan)} ({level}), part {part}/{len(bodies)}, "
                      f"robots {', '.join(r.name for r in robots)}: {channel.size(request):,} "
                      f"of {channel.limit():,} bytes", file=err)
    return 0


WEBHOOK_DINGTALK_PORT = 8060    # prometheus-webhook-dingtalk's --web.listen-address


def import_webhook_dingtalk(path, out=sys.stdout, err=sys.stderr):
    """--import-webhook-dingtalk: prometheus-webhook-dingtalk's config.yml as the config.ini
    that does the same (each target a receiver of its name, with a robot of its name: its
    /dingtalk/TARGET/send URLs keep working), on `out`; what needs a human (Go templates, mobiles
    that are no phone numbers) as comments in it and on `err`. A value config.ini cannot hold as
    the YAML says it is refused, naming its key (see _ini_text). 0 done, 2 cannot read or
    convert it (nothing on `out`)."""
    try:
        import yaml
    except ImportError:
        print("--import-webhook-dingtalk reads YAML with PyYAML, which is not installed: pip "
              "install pyyaml, or apt-get install python3-yaml (dnf install python3-pyyaml); "
              "the daemon itself does not need it", file=err)
        return 2
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror}", file=err)
        return 2
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        print(f"{path}: not YAML: {str(exc).splitlines()[0]}", file=err)
        return 2
    targets = loaded.get("targets") if isinstance(loaded, dict) else None
    if not isinstance(targets, dict) or not targets:
        print(f"{path}: no targets: not a prometheus-webhook-dingtalk config", file=err)
        return 2
    human = [f"{key}: Go templates are not converted: alertbridge's [templates] "
             f"(docs/configuration.md) has the fields; the built-in page is already in Chinese"
             for key in ("templates", "template", "default_message", "no_builtin_template")
             if loaded.get(key)]
    try:
        lines = _imported_service(loaded)
        for name, target in targets.items():
            lines += _imported_target(name, target, human)
    except ImportRefused as exc:
        print(f"{path}: {exc}: nothing was converted", file=err)
        return 2
    source = _CONTROL_CHARACTERS.sub(lambda m: ascii(m.group())[1:-1], str(path))
    header = [f"; Converted by alertbridge {VERSION} --import-webhook-dingtalk from {source}.",
              "; Each target is a [receiver:NAME] with a [robot:NAME]: Alertmanager's",
              "; webhook_configs URLs, http://HOST:8060/dingtalk/NAME/send, work unchanged."]
    header += [f"; NEEDS A HUMAN: {note}" for note in human]
    print("\n".join(header + [""] + lines), file=out)
    for note in human:
        print(f"needs a human: {note}", file=err)
    return 0


class ImportRefused(Exception):
    """A value of the imported YAML that config.ini cannot hold as the YAML says it: the
    message names its key, never the value (it may be a secret)."""


TARGET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")    # prometheus-webhook-dingtalk's own rule


def _yaml_kind(value):
    """What a YAML value is, as an error names it."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a mapping"
    return "null" if value is None else f"a {type(value).__name__}"


def _ini_text(value, where):
    """A YAML string as a config.ini value that load_config reads back as exactly it, else
    ImportRefused naming `where`. Refused: any other type (YAML read 0x1F as 31 and yes as
    true: the text as written is gone), a line break or other control character, U+2028 too
    (the rest would be a line of its own: a key, a [section]), spaces at either end
    (configparser drops them), and ${ (load_config reads ${NAME} from the environment)."""
    if not isinstance(value, str):
        raise ImportRefused(f"{where}: is {_yaml_kind(value)} in YAML, not text (quote it)")
    if _CONTROL_CHARACTERS.search(value):
        raise ImportRefused(f"{where}: holds a line break or another control character")
    if value != value.strip():
        raise ImportRefused(f"{where}: begins or ends with a space")
    if "${" in value:
        raise ImportRefused(f"{where}: holds ${{, which config.ini reads as an environment "
                            f"variable")
    return value


def _imported_service(loaded):
    """The [alertbridge] lines on prometheus-webhook-dingtalk's port, and its timeout (a Go
    duration, which config.ini reads as it is: 1m30s) as [delivery] timeout; 0, no timeout
    there, leaves alertbridge's default."""
    lines = ["[alertbridge]", "listen = 0.0.0.0", f"port = {WEBHOOK_DINGTALK_PORT}"]
    written = loaded.get("timeout")
    if written is None:
        return lines
    if not isinstance(written, str) or duration_seconds(written) is None:
        raise ImportRefused("timeout: not a duration (write 5s or 1m30s, as Go does)")
    if duration_seconds(written):
        lines += ["", "[delivery]", f"timeout = {_ini_text(written.strip(), 'timeout')}"]
    return lines


def _imported_target(name, target, human):
    """The [receiver:NAME] and [robot:NAME] lines of one target; what cannot be converted goes
    to `human`; ImportRefused for what config.ini cannot hold as the YAML says it."""
    if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise ImportRefused(f"targets: {ascii(str(name))[:60]} is not a target name (a letter, "
                            f"then letters, digits, - and _, as prometheus-webhook-dingtalk "
                            f"requires)")
    where = f"targets.{name}"
    target = {} if target is None else target
    if not isinstance(target, dict):
        raise ImportRefused(f"{where}: is {_yaml_kind(target)} in YAML, not a mapping (url, "
                            f"secret, mention, message)")
    url = "" if target.get("url") is None else _ini_text(target["url"], f"{where}.url")
    robot = ["", f"[robot:{name}]", f"url = {url}"]
    if target.get("secret") is not None:
        robot.append(f"secret = {_ini_text(target['secret'], f'{where}.secret')}")
    receiver = ["", f"[receiver:{name}]", f"robots = {name}"] + _imported_mention(
        name, target.get("mention"), human)
    if target.get("message"):
        human.append(f"[receiver:{name}]: its message templates (Go) are not converted; the "
                     f"receiver uses [templates]")
    if not url:
        human.append(f"[robot:{name}] url: the target has none")
    return receiver + robot


def _imported_mention(name, mention, human):
    """A target's mention: all (true or false) as at_all, its mobiles that are phone numbers
    as at_mobiles; the others go to `human`, quoted as Python does (escapes, one line)."""
    where = f"targets.{name}.mention"
    mention = {} if mention is None else mention
    if not isinstance(mention, dict):
        raise ImportRefused(f"{where}: is {_yaml_kind(mention)} in YAML, not a mapping (all, "
                            f"mobiles)")
    if mention.get("all") not in (None, True, False):
        raise ImportRefused(f"{where}.all: is {_yaml_kind(mention['all'])} in YAML, not true "
                            f"or false")
    mobiles = [] if mention.get("mobiles") is None else mention["mobiles"]
    if not isinstance(mobiles, list):
        raise ImportRefused(f"{where}.mobiles: is {_yaml_kind(mobiles)} in YAML, not a list")
    lines = ["at_all = true"] if mention.get("all") else []
    valid = [m for m in mobiles if isinstance(m, str) and MOBILE.fullmatch(m)]
    if valid:
        lines.append(f"at_mobiles = {', '.join(valid)}")
    for number, mobile in enumerate(mobiles, 1):
        if not isinstance(mobile, str):
            human.append(f"[receiver:{name}] at_mobiles: mobile {number} is "
                         f"{_yaml_kind(mobile)} in YAML, its digits as written unknown: quote "
                         f"it, then add it")
        elif mobile not in valid:
            human.append(f"[receiver:{name}] at_mobiles: {mobile!r} is not a phone number; "
                         f"write the real one")
    return lines


def send_test(config, route_name):
    """--send-test: one test message through each robot of a route; 0 if all took it. Through
    the running daemon when there is one and its running config has this route as the file
    has it (its budgets count it), else directly through the file's robots, within the budgets
    the journal's send log shows. The first line says which."""
    route = config.routes.get(route_name)
    if route is None:
        print(f"no [receiver:{route_name}] in {config.path}", file=sys.stderr)
        return 2
    port = f":{config.service.port}"
    url = daemon_url(config.service) + "/-/send-test?" + urllib.parse.urlencode(
        {"receiver": route_name, "route": route.fingerprint()})
    not_ours = f"what answers on {port} is not alertbridge"
    try:
        answer = ask_daemon(config.auth, url)
    except OSError:                 # no daemon listening: send from here
        answer, how = None, f"no daemon answers on {port}"
    except ValueError:              # not JSON: something else holds the port
        answer, how = None, not_ours
    if answer is not None and not isinstance(answer[1], dict):
        answer, how = None, not_ours
    if answer is not None and not answer[1].get("differs"):
        status, reply = answer
        print("\n".join([f"via the daemon on {port}, {daemon_loaded(config, reply)}"]
                        + (reply.get("robots") or [reply.get("error", f"HTTP {status}")])))
        return 0 if status == 200 and reply.get("ok") else 1
    if answer is None:
        holder = journal_holder(config.service.journal)
        if holder:
            print(f"an alertbridge (pid {holder}) holds the journal {config.service.journal} "
                  f"but does not answer on {daemon_url(config.service)}: not sending outside "
                  f"its budgets", file=sys.stderr)
            return 1
    else:
        how = (f"the daemon on {port} runs another [receiver:{route_name}] "
               f"({daemon_loaded(config, answer[1])}); reload it to make this file's its own")
    print(f"directly, through the robots of {config.path}: {how}")
    pool = RobotPool(lambda: config.delivery, classify=lambda: classify(config.robots),
                     windows=lambda: config.budget_windows)
    pool.restore(journal_sends(config.service.journal), time.time())
    channels = Channels(lambda: config)
    renderer = Renderer(lambda: config)
    lines, ok = send_test_messages(route, renderer, channels, pool, channels.post, time.time,
                                   config.delivery.timeout)
    pager = AppPager(lambda: config, AppAPI(lambda: config, Metrics()), None, renderer)
    card_lines, card_ok = pager.send_test(route)
    lines, ok = lines + card_lines, ok and card_ok
    print("\n".join(lines))
    return 0 if ok else 1


def daemon_loaded(config, reply):
    """When a daemon's running config was loaded, as its reply to --send-test says."""
    loaded_at = reply.get("config_loaded_at")
    if not isinstance(loaded_at, (int, float)):
        return "its config loaded at a time it does not say (an older alertbridge)"
    shown = datetime.fromtimestamp(loaded_at, config.tz).strftime("%Y-%m-%d %H:%M:%S %z")
    return f"its config loaded at {shown}"


def daemon_url(service):
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(service.listen,
                                                                     service.listen)
    return f"http://{host}:{service.port}" if ":" not in host else f"http://[{host}]:{service.port}"


def ask_daemon(auth, url, timeout=60.0):
    """POST to the running daemon with [auth]'s credentials: (status, JSON reply). OSError if
    nothing listens."""
    headers = {"Content-Length": "0"}
    if auth.bearer_token:
        headers["Authorization"] = f"Bearer {auth.bearer_token}"
    elif auth.username:
        basic = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: no proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read())
        return exc.code, {"error": f"HTTP {exc.code}"}


def journal_holder(path):
    """The pid of the daemon that holds a journal's lock, or None. The lock file is only read:
    one made by root here would keep the daemon's own user out of it."""
    try:
        with open(path + ".lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return lock.read().strip() or "unknown"
    except OSError:
        return None
    return None


def journal_sends(path):
    """A stopped daemon's recent send log, read without writing anything next to the journal
    (no -wal or -shm file owned by whoever runs this): (robot key, at, errcode)."""
    if not os.path.exists(path):
        return []
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro&immutable=1", uri=True)
        try:
            rows = db.execute(SQLITE.sql(J_SENDS_SINCE), (time.time() - 3600,)).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    return [(key or name, at, errcode) for name, key, at, errcode in rows]


def init_db(config):
    missing = DIALECTS[config.database.driver].missing_driver()
    if missing:
        print(f"cannot reach the history store: {missing}", file=sys.stderr)
        return 1
    store = Store(config.database)
    try:
        store.ping()
    except StoreUnavailable as exc:
        print(f"cannot reach the history store: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"schema ready in {store.describe()}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Prometheus Alertmanager -> DingTalk bridge with alert history. With no "
                    "command flag below, it runs the daemon (SIGHUP reloads, SIGTERM stops).")
    parser.add_argument("-c", "--config", default="config.ini",
                        help="config file (default: config.ini)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help=argparse.SUPPRESS)  # the store process's; log_format in the config
    parser.add_argument("--version", action="version", version=f"alertbridge {VERSION}")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check-config", action="store_true",
                        help="validate the config, print a summary, exit")
    action.add_argument("--send-test", metavar="RECEIVER",
                        help="send a test message through each robot of RECEIVER: through "
                             "the daemon that listens on the config's port, with its running "
                             "config, when one does and its config for RECEIVER is this "
                             "file's; else directly, through this file's robots (it says "
                             "which), exit")
    action.add_argument("--check-app", action="store_true",
                        help="check the [app] credentials with DingTalk (a token, a Stream "
                             "ticket), exit")
    action.add_argument("--init-db", action="store_true",
                        help="create the history tables if missing, exit")
    action.add_argument("--render", metavar="PAYLOAD",
                        help="print the DingTalk request bodies an Alertmanager webhook (a JSON "
                             "file, - for stdin) gives, one per line; sends nothing")
    action.add_argument("--import-webhook-dingtalk", metavar="CONFIG_YML",
                        help="print the config.ini equivalent to a prometheus-webhook-dingtalk "
                             "config.yml (needs PyYAML); no config.ini is read")
    action.add_argument("--store-process", type=int, metavar="FD",
                        help=argparse.SUPPRESS)  # see StoreProcess
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.store_process is not None:
        return serve_store(args.store_process)
    if args.import_webhook_dingtalk:
        return import_webhook_dingtalk(args.import_webhook_dingtalk)
    one_shot = (args.check_config or args.check_app or args.send_test or args.init_db
                or args.render)
    if one_shot:  # Ctrl-C as usual
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        print(f"alertbridge needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer (the journal "
              f"uses upserts and renames columns); this Python uses SQLite "
              f"{sqlite3.sqlite_version}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    apply_log_format(config.service.log_format)
    if not one_shot:
        return run(config)
    try:
        return command(config, args)
    except BrokenPipeError:         # `--check-config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def command(config, args):
    """The one-shot commands: --check-config, --check-app, --send-test, --init-db, --render."""
    if args.check_config:
        errors, notes = preflight(config)
        summary = check_config(config)
        print("\n".join([summary.replace(": OK", ": NOT OK", 1) if errors else summary]
                        + [f"note: {note}" for note in notes]))
        sys.stdout.flush()
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 1 if errors else 0
    if args.check_app:
        return check_app(config)
    if args.send_test:
        return send_test(config, args.send_test)
    if args.init_db:
        return init_db(config)
    return render_payload(config, args.render)


def run(config):
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the config.

    The three signals are blocked in every thread (from the top of the file on, before any
    thread exists, so all inherit it) and taken here by the main thread with sigwait(). A signal
    that comes early waits until we can act on it instead of killing us; one the kernel would
    hand to another thread is not lost while the main thread sleeps in a lock."""
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)  # already so when run as a script
    try:
        bridge = Bridge(config).start(fork_store=True)
    except StartError as exc:
        print(f"alertbridge: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, JournalDamaged) else 1
    except OSError as exc:      # a cause not foreseen: still one line, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"alertbridge: cannot start: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    while True:
        signum = signal.sigwait(DAEMON_SIGNALS)
        if signum != signal.SIGHUP:
            break
        bridge.reload()
    log.info("stopping: finishing in-flight requests (%s)", signal.Signals(signum).name)
    bridge.stop()
    log.info("stopped")
    return 0


# =============================================================================================
# 18. The DingTalk app: its OpenAPI, its Stream connection, cards and commands
# =============================================================================================
#
# A wing, off unless [app] is set: the enterprise app robot. AppAPI (token, Stream tickets,
# cards, DING), the StreamClient on the WebSocket client (the leader's connection to DingTalk's
# gateway), AppPager (pages as cards, updated in place), AppDesk (clicks and commands, acting
# through the Desk).

CARD_CALLBACK = "/v1.0/card/instances/callback"     # a card's button clicked
BOT_MESSAGE = "/v1.0/im/bot/messages/get"           # someone wrote to the app robot
DING_TYPES = {"app": 1, "sms": 2, "call": 3}        # [app] ding -> DING's remindType


def undelivered(answer):
    """Why createAndDeliver's answer is a card nobody sees ("" if every space got it): the call
    succeeds once the card is created, and each space says whether it was delivered there (not
    if the robot is not in the group, or the group is not the one meant)."""
    result = answer.get("result")
    spaces = result.get("deliverResults") if isinstance(result, dict) else None
    if not isinstance(spaces, list) or not spaces:
        return "the answer does not say the card was delivered (no deliverResults)"
    for space in spaces:
        if not isinstance(space, dict) or space.get("success") is not True:
            space = space if isinstance(space, dict) else {}
            return (f"the card was not delivered to {space.get('spaceType', '?')} "
                    f"{str(space.get('spaceId', '?'))[:80]}: "
                    f"{str(space.get('errorMsg', 'no reason given'))[:200]}")
    return ""


class AppError(ChannelError):
    """The app's OpenAPI refused a call or did not answer. `status`: the HTTP status, if any;
    `throttled`: its rate limit (that API waits THROTTLE_REST before calling again)."""

    def __init__(self, message, status=None, throttled=False):
        super().__init__(message)
        self.status, self.throttled = status, throttled


class AppAPI:
    """DingTalk's OpenAPI as the app uses it: an access token kept until TOKEN_MARGIN before it
    expires (and fetched again once if refused), the Stream gateway's tickets, interactive
    cards (created and delivered to a group, updated in place), DING. An API DingTalk throttles
    (token, gateway, card, ding) makes no call for THROTTLE_REST seconds; the others go on, so
    a throttled gateway does not keep cards off the air (pages go through the custom robots
    only while the card API or the token rests). `config()` gives the running Config; `clock`:
    steady seconds; `wall`: when the last error came (epoch). _lock guards the token and the
    rests."""

    TOKEN_MARGIN = 300.0
    THROTTLE_REST = 2.0

    def __init__(self, config, metrics, clock=time.monotonic, wall=wall_time):
        self.config, self.metrics, self.clock, self.wall = config, metrics, clock, wall
        self._lock = threading.Lock()
        self._token = ("", "", 0.0)         # (client id, token, valid until)
        self._rests = {}                    # api -> steady time it may call again
        self.last_error, self.last_error_at = "", None

    @property
    def throttled_until(self):
        """When the last API DingTalk throttled may call again (what the status page shows)."""
        with self._lock:
            return max(self._rests.values(), default=0.0)

    def resting(self, api):
        """Whether `api` is resting after DingTalk throttled it."""
        with self._lock:
            return self.clock() < self._rests.get(api, 0.0)

    def token(self):
        app = self.config().app
        with self._lock:
            client, token, until = self._token
            if token and client == app.client_id and self.clock() < until:
                return token
        answer = self._call("token", "POST", "/v1.0/oauth2/accessToken",
                            {"appKey": app.client_id, "appSecret": app.client_secret}, token="")
        token, expires = answer.get("accessToken"), answer.get("expireIn")
        if not isinstance(token, str) or not token or not isinstance(expires, (int, float)):
            raise AppError("the token answer has no accessToken and expireIn")
        with self._lock:
            self._token = (app.client_id, token, self.clock() + max(expires - self.TOKEN_MARGIN,
                                                                    expires / 2))
        return token

    def open_stream(self, topics):
        """(endpoint, ticket) of a new Stream connection for these callback topics."""
        app = self.config().app
        answer = self._call("gateway", "POST", "/v1.0/gateway/connections/open", {
            "clientId": app.client_id, "clientSecret": app.client_secret,
            "subscriptions": [{"type": "CALLBACK", "topic": t} for t in topics],
            "ua": f"alertbridge/{VERSION}", "localIp": ""}, token="")
        return self.gateway_endpoint(answer, app.api_url)

    @staticmethod
    def gateway_endpoint(answer, api_url):
        """(endpoint, ticket) of the gateway's answer. Over an https api_url only a wss://
        endpoint: a ws:// one would carry the ticket and every click in clear text (an http
        api_url, a test's or a proxy's on the host, may give ws://)."""
        endpoint, ticket = answer.get("endpoint"), answer.get("ticket")
        schemes = ("ws://", "wss://") if api_url.startswith("http://") else ("wss://",)
        if not (isinstance(endpoint, str) and endpoint.startswith(schemes)
                and isinstance(ticket, str) and ticket):
            raise AppError(f"the gateway's answer has no {' or '.join(schemes)} endpoint and "
                           f"ticket" + ("" if len(schemes) == 2 else " (api_url is https)"))
        return endpoint, ticket

    def send_card(self, track, group, params, at_user_ids=()):
        """An interactive card of the app's template, in a group (its openConversationId),
        known by `track` (its outTrackId); its buttons call back over the Stream connection."""
        app = self.config().app
        deliver = {"robotCode": app.robot}
        if at_user_ids:
            deliver["atUserIds"] = {u: u for u in at_user_ids}
        self._call("card", "POST", "/v1.0/card/instances/createAndDeliver", {
            "cardTemplateId": app.card_template, "outTrackId": track, "callbackType": "STREAM",
            "cardData": {"cardParamMap": params}, "openSpaceId": f"dtv1.card//IM_GROUP.{group}",
            "imGroupOpenSpaceModel": {"supportForward": True},
            "imGroupOpenDeliverModel": deliver, "userIdType": 1}, check=undelivered)

    def update_card(self, track, params):
        self._call("card", "PUT", "/v1.0/card/instances", {
            "outTrackId": track, "cardData": {"cardParamMap": params},
            "cardUpdateOptions": {"updateCardDataByKey": True}})

    def ding(self, user_ids, text):
        """DING people as [app] ding says (in the app, SMS, a call: editions and packages
        allowing; at most 20 people)."""
        app = self.config().app
        self._call("ding", "POST", "/v1.0/robot/ding/send", {
            "robotCode": app.robot, "remindType": DING_TYPES[app.ding],
            "receiverUserIdList": list(user_ids)[:20], "content": text})

    def _call(self, api, method, path, body, token=None, check=None):
        """One call; a token refused is fetched again once. The answer, a dict. `check(answer)`
        says why a successful answer is still a refusal ("" if it is not)."""
        try:
            return self._request(api, method, path, body, token, check)
        except AppError as exc:
            if token is not None or exc.status != 401:
                raise
            with self._lock:
                self._token = ("", "", 0.0)
            return self._request(api, method, path, body, token, check)

    def _request(self, api, method, path, body, token, check):
        app = self.config().app
        if self.resting(api):
            self.metrics.inc("alertbridge_app_requests_total", api=api, outcome="held")
            raise AppError(f"throttled by DingTalk ({api}): resting", throttled=True)
        headers = {} if token is not None else {"x-acs-dingtalk-access-token": self.token()}
        try:
            status, raw = exchange_json(method, app.api_url + path, body, headers, app.timeout,
                                        1 << 20)
        except NO_ANSWER as exc:
            self._count(api, "error", _no_answer(exc))
            raise AppError(_no_answer(exc)) from exc
        if status >= 400:
            raise self._refused(api, status, raw[:2048])
        try:
            answer = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as exc:
            why = f"the answer is not JSON: {raw[:40]!r}"
            self._count(api, "error", why)
            raise AppError(why, status) from exc
        if not isinstance(answer, dict) or answer.get("success") is False:
            raise self._refused(api, 200, json.dumps(answer)[:2048].encode())
        why = check(answer) if check else ""
        if why:
            self._count(api, "refused", why)
            raise AppError(why, 200)
        self._count(api, "ok")
        return answer

    def _refused(self, api, status, raw):
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            answer = {}
        answer = answer if isinstance(answer, dict) else {}
        code, text = str(answer.get("code", "")), str(answer.get("message", ""))[:200]
        throttled = status == 429 or "QpsLimit" in code or "Throttling" in code
        if throttled:
            with self._lock:
                self._rests[api] = self.clock() + self.THROTTLE_REST
        self._count(api, "throttled" if throttled else "refused", f"HTTP {status} {code} {text}")
        return AppError(f"HTTP {status} {code} {text}".strip(), status, throttled)

    def _count(self, api, outcome, error=""):
        self.metrics.inc("alertbridge_app_requests_total", api=api, outcome=outcome)
        if error:
            self.last_error, self.last_error_at = error, self.wall()


class MalformedFrame(ValueError):
    """A Stream frame that is not one DingTalk sends; `message_id`: its id, if it has a usable
    one (the frame is then answered with an error, else ignored)."""

    def __init__(self, why, message_id=None):
        super().__init__(why)
        self.message_id = message_id


class StreamClient(Worker):
    """The app's Stream connection, held only while this instance may send (a cluster's
    leader; a new leader opens its own): a WebSocket to DingTalk's gateway, opened with a fresh
    ticket, that brings card clicks and messages written to the robot. Each frame is answered
    as DingTalk's SDKs answer it, with its messageId: a callback's answer under `response` in
    the acknowledgement's data (a frame seen again gets the same answer); a SYSTEM frame (ping,
    disconnect) with its data. A frame that is not one DingTalk sends is logged and answered
    with an error or ignored, one by one: it never ends the connection. A ping goes out when
    the connection has been quiet PING_EVERY seconds; quiet for DEAD_AFTER, it is half-open
    and given up. `handle(topic, data)` answers a callback (AppDesk.handle).

    Reconnecting: at once after a connection that lasted (open LASTED seconds, or SERVED_FOR
    seconds with a new callback answered: the gateway served it; a callback delivered again
    proves nothing), and the delays start again; after any other end (the
    gateway's `disconnect`, a close, a failed ticket or handshake) after growing delays with
    jitter (retry_delay from BACKOFF: 0.5-1 s, 1-2 s, ... up to 30-60 s), so that a gateway
    ending every connection at once is not asked for tickets in a loop. Each end is counted in
    alertbridge_app_stream_disconnects_total by reason (REASONS)."""

    PING_EVERY = 20.0
    DEAD_AFTER = 50.0
    LOOK = 1.0              # how often the connection checks it is still the leader's
    LASTED = 60.0           # a connection open this long worked: the next is made at once
    SERVED_FOR = 5.0        # ... or this long, with a new callback answered
    BACKOFF = (1.0, 60.0)   # retry_delay's base and longest, in seconds
    ANSWERS_KEPT = 256
    MAX_ID = 256            # a messageId's length (answers are kept by it)
    SAY_AGAIN = 60.0        # the same malformed frame is logged once in this many seconds
    REASONS = ("disconnect", "dropped", "half_open", "connect_failed")

    def __init__(self, config, api, handle, cluster):
        super().__init__("stream")
        self.config, self.api, self.handle, self.cluster = config, api, handle, cluster
        self.socket = None
        self.connected_at = None        # the wall clock, while connected
        self.last_error = ""            # why the last connection ended or could not be made
        self._answers = Recent(self.ANSWERS_KEPT)       # messageId -> the answer given
        self._opening = None            # the ConnectDeadline of a connection being made
        self.reconnect = Retry("stream")    # connections in a row that did not last
        self._served = False            # the connection brought a callback, answered
        self._said = ("", 0.0)          # the last malformed frame logged, and when

    def stop(self):
        super().stop()
        opening, socket_ = self._opening, self.socket
        if opening is not None:
            opening.cut()
        if socket_ is not None:
            socket_.close(1001)

    def backlog(self):
        return 0

    def sleep_for(self):
        return self.LOOK if self.config().app.enabled else 30.0

    def failed(self, exc):
        """A step that raised (a bug, not the network: connections end inside the step)."""
        if self._stopping.is_set():
            return 0.0
        return super().failed(exc)

    def step(self):
        if not self.config().app.enabled or not self.cluster.may_send():
            return False
        reason, error, lasted = self._connection()
        if reason is None or self._stopping.is_set():   # ours: stopped, not the leader, [app]
            return not self._stopping.is_set()
        self.api.metrics.inc("alertbridge_app_stream_disconnects_total", reason=reason)
        delay = self._delay(lasted, error)
        self._tell(reason, error, delay)
        self._stopping.wait(delay)
        return not self._stopping.is_set()

    def _delay(self, lasted, error):
        """No delay after a connection that lasted (and the delays start again), else the next
        of the growing delays; at least the API's rest if DingTalk throttled the gateway."""
        if lasted:
            self.reconnect.worked()
            return 0.0
        delay = self.reconnect.next_wait(*self.BACKOFF)
        if getattr(error, "throttled", False):
            delay = max(delay, self.api.THROTTLE_REST)
        return delay

    def _tell(self, reason, error, delay):
        """The log line and the status page's reason: a new error is told, a repeat is not."""
        if self._stopping.is_set():
            return
        text = (f"{type(error).__name__}: {error}" if error is not None else
                "the gateway asked to reconnect (disconnect)" if reason == "disconnect" else
                f"nothing heard for {self.DEAD_AFTER:g} s, a ping unanswered: half-open")
        self.last_error = text
        self.reconnect.tell(f"stream: {text}; connecting again in {delay:.1f} s", same_as=text)

    def _connection(self):
        """One connection, from its ticket to its end: (why it ended, the error if any, whether
        it lasted). Why: one of REASONS, or None for an end of ours."""
        try:
            ws = self._connect()
        except (WebSocketClosed, AppError, OSError, ValueError) as exc:
            return "connect_failed", exc, False
        opened, self._served = time.monotonic(), False
        self.socket, self.connected_at = ws, wall_time()
        try:
            reason, error = self._serve(ws), None
        except (WebSocketClosed, OSError) as exc:
            reason, error = "dropped", exc
        finally:
            self.socket, self.connected_at = None, None
            ws.close()
        if self._stopping.is_set():
            return None, None, True
        open_for = time.monotonic() - opened
        return reason, error, open_for >= (self.SERVED_FOR if self._served else self.LASTED)

    def _connect(self):
        """A ticket, then the WebSocket within [app] timeout; stop() cuts it short."""
        app = self.config().app
        endpoint, ticket = self.api.open_stream((CARD_CALLBACK, BOT_MESSAGE))
        url = endpoint + ("&" if "?" in endpoint else "?") + "ticket=" + urllib.parse.quote(ticket)
        self._opening = opening = ConnectDeadline(app.timeout)
        if self._stopping.is_set():     # stop() came before it could see this connection
            opening.cut()
        try:
            ws = WebSocket.connect(url, app.timeout, deadline=opening)
        finally:
            self._opening = None
        log.info("stream: connected to DingTalk's gateway (%s)", urllib.parse.urlsplit(
            endpoint).hostname)
        return ws

    def _serve(self, ws):
        """Frames until the connection ends: "disconnect" (the gateway asked: answered, then
        closed), "half_open", or None for an end of ours (stopped, not the leader any more,
        [app] changed: connect again at once). A connection that breaks raises."""
        pinged, app = time.monotonic(), self.config().app
        while not self._stopping.is_set():
            if not self.cluster.may_send():
                log.info("stream: not the leader any more: closing the connection")
                return None
            if self.config().app != app:
                log.info("stream: [app] changed: connecting again")
                return None
            try:
                text = ws.recv(self.LOOK)
            except socket.timeout:
                now = time.monotonic()
                if now - ws.heard > self.DEAD_AFTER:
                    return "half_open"
                if now - max(ws.heard, pinged) >= self.PING_EVERY:
                    ws.ping()
                    pinged = now
                continue
            answer, kind, topic = self.answer(text)
            if answer is not None:
                ws.send_text(json.dumps(answer, ensure_ascii=False))
            if kind == "SYSTEM" and topic == "disconnect":
                log.info("stream: the gateway asks to reconnect")
                return "disconnect"
        return None

    def answer(self, text):
        """(the acknowledgement of one frame or None, its type, its topic). Whatever the frame
        holds, it is dealt with here: nothing in it ends the connection."""
        try:
            kind, topic, message_id, data = self._read(text)
            again = self._answers.get(message_id) is not None
            ack = self._acknowledgement(kind, topic, message_id, data)
            self._served = self._served or (kind == "CALLBACK" and ack["code"] == 200
                                            and not again)
            return ack, kind, topic
        except MalformedFrame as exc:
            answered = exc.message_id is not None
            self._malformed(f"{exc}: {'answered 400' if answered else 'ignored'}")
            return (self._ack(exc.message_id, 400, "malformed frame", "") if answered else None,
                    None, None)
        except Exception as exc:  # noqa: BLE001 (one bad frame must not end the connection)
            log.error("stream: a frame: %s: %s", type(exc).__name__, exc, exc_info=exc)
            return None, None, None

    def _read(self, text):
        """(type, topic, messageId, data) of a frame as DingTalk sends it; MalformedFrame."""
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):
            raise MalformedFrame("that is not JSON") from None
        headers = frame.get("headers") if isinstance(frame, dict) else None
        if not isinstance(headers, dict):
            raise MalformedFrame("without headers")
        message_id = headers.get("messageId")
        if not isinstance(message_id, str) or not 0 < len(message_id) <= self.MAX_ID:
            raise MalformedFrame(f"whose messageId is not a string of 1 to {self.MAX_ID} "
                                 f"characters")
        kind, topic, data = frame.get("type"), headers.get("topic"), frame.get("data")
        if kind not in ("SYSTEM", "EVENT", "CALLBACK") or not isinstance(topic, str):
            raise MalformedFrame("of no known type or topic", message_id)
        if data is not None and not isinstance(data, str):
            raise MalformedFrame("whose data is not a string", message_id)
        return kind, topic, message_id, data or ""

    def _acknowledgement(self, kind, topic, message_id, data):
        """As the SDKs: SYSTEM frames answered with their own data; a callback with its answer
        under `response`, kept for a frame seen again; events, not subscribed to, not handled."""
        if kind == "SYSTEM":
            return self._ack(message_id, 200, "OK", data)
        if kind == "EVENT":
            return self._ack(message_id, 404, "not handled", "")
        answered = self._answers.get(message_id)
        if answered is not None:
            return answered
        try:
            fields = json.loads(data or "{}")
        except (ValueError, RecursionError):
            fields = None
        if not isinstance(fields, dict):
            raise MalformedFrame("whose data is not a JSON object", message_id)
        try:
            result = self.handle(topic, fields)
        except Exception as exc:  # noqa: BLE001 (one bad callback must not end the connection)
            log.error("stream: topic=%s: %s: %s", logfmt(topic[:200]), type(exc).__name__, exc,
                      exc_info=exc)
            return self._ack(message_id, 500, "error", "")
        response = json.dumps({"response": result or {}}, ensure_ascii=False)
        return self._answers.put(message_id, self._ack(message_id, 200, "", response))

    @staticmethod
    def _ack(message_id, code, message, data):
        return {"code": code, "headers": {"messageId": message_id,
                                          "contentType": "application/json"},
                "message": message, "data": data}

    def _malformed(self, why):
        """Logged, once a while for the same fault (a gateway repeating it fills no disk)."""
        now = time.monotonic()
        if why != self._said[0] or now - self._said[1] >= self.SAY_AGAIN:
            log.warning("stream: a frame %s", why)
            self._said = (why, now)


def card_track(route_name, group):
    """A card's outTrackId: its incident's route and group, and a nonce (a group that fires
    again after it resolved gets a new card)."""
    name = base64.urlsafe_b64encode(route_name.encode()).decode().rstrip("=")
    return f"{name}.{group}.{secrets.token_hex(4)}"


def read_track(track):
    """(route name, group hash) of a card's outTrackId, or None."""
    pieces = str(track).split(".")
    if len(pieces) != 3 or not re.fullmatch(r"[0-9a-f]{64}", pieces[1]):
        return None
    try:
        name = base64.urlsafe_b64decode(pieces[0] + "=" * (-len(pieces[0]) % 4)).decode()
    except ValueError:
        return None
    return name, pieces[1]


class AppPager:
    """Pages through the app for routes with app_group: a firing group's first page is an
    interactive card (the page's text, Claim and Silence buttons, its links), its next pages
    and its resolution update that card in place; what the card shows of its incident changes
    with it (claimed, silenced). The journal knows each group's open card. Any failure raises
    AppError: the sender then sends the page through the custom robots."""

    robot = Robot(name="app", url="")   # how the sends, the metrics and the history name it

    def __init__(self, config, api, journal, renderer):
        self.config, self.api, self.journal = config, api, journal
        self.renderer = renderer

    @staticmethod
    def takes(route, body):
        return bool(route.app_group and body.kind == ALERTS and not body.digest
                    and body.group_key and not body.part)

    def page(self, route, body, level=NO_LEVEL, send_keys=()):
        """Put the body on the group's card: (done, carried). Not done if there is no card to
        put a resolution on (the robots send it, as any message). A card @-mentions user ids
        only: whoever the page mentions by mobile, or everyone, hears it in a NOTE through the
        robots right after, which then carries the page's `send_keys` (carried: the page counts as
        sent across a cluster once that note is; a leader dying between the two sends the page
        again rather than lose the @)."""
        group = group_hash(body.group_key)
        track = self.journal.open_card(route.name, group)
        firing = any(a["status"] == "firing" for a in body.alerts)
        if not firing and track is None:
            return False, False
        rendered = self.renderer.render(route, replace(body, group_key=""))  # no link notes
        params = self.card_params(route, body, rendered, "open" if firing else "resolved")
        if track is None:
            track = card_track(route.name, group)
            self.api.send_card(track, route.app_group, params,
                               rendered.mentions.user_ids_of(DEFAULT_KIND))
            self.journal.card_opened(route.name, group, track)
            return True, self._mention_beside(route, rendered, track, level, send_keys)
        if firing:      # the group again: its text; a claim or silence shown stays shown
            self.api.update_card(track, {k: v for k, v in params.items()
                                         if k not in ("state", "status")})
        else:           # resolved: the card is the incident's no more, shown or not
            try:
                self.api.update_card(track, params)
            finally:
                self.journal.card_closed(track)
        return True, False

    def _mention_beside(self, route, rendered, track, level, send_keys):
        """The card's @ note, if it needs one (True: it carries the page's send keys)."""
        mentions = rendered.mentions
        if not (mentions.mobiles or mentions.all):
            return False
        text = WORDS[route.language]["card_mention"].format(title=md_escape(rendered.title))
        self.journal.note(route.name, text[:128], text, 0, list(send_keys), level=level,
                          mention=Mentions(mentions.mobiles, (), mentions.all),
                          request_id=f"card-mention:{track}")
        return True

    def card_params(self, route, body, rendered, state):
        """What the card template shows (docs/dingtalk-app.md names each variable): its title
        and text are markdown, alert text escaped in both."""
        words = WORDS[route.language]
        fields = alert_fields(body.alerts[0], self.config().tz, route)
        return {"title": rendered.heading, "markdown": self.renderer.SEPARATOR.join(
                    rendered.blocks + rendered.notes),
                "state": state, "status": words["resolved_card"] if state == "resolved" else "",
                "claim_label": words["claim"], "silence_1h_label": "🔕 1 h",
                "silence_4h_label": "🔕 4 h", "runbook_url": fields["runbook_url"],
                "dashboard_url": fields["dashboard_url"]}

    def send_test(self, route):
        """--send-test: a card of the sample alert in the route's app_group, if it has one, for
        no incident (a click on it finds nothing open). The lines to show, and whether DingTalk
        delivered it: what proves the credentials, the template and the robot in the group."""
        app = self.config().app
        if not (route.app_group and app.enabled):
            return [], True
        body = Body(alerts=(sample_alert(route.name),))
        params = self.card_params(route, body, self.renderer.render(route, body), "open")
        track = card_track(route.name, group_hash("alertbridge --send-test"))
        try:
            self.api.send_card(track, route.app_group, params)
        except AppError as exc:
            return [f"app card to {route.app_group}: NOT delivered: {exc}"], False
        return [f"app card to {route.app_group}: delivered (template {app.card_template})"], True

    def tell(self, route_name, group, state, status):
        """Show an incident's new state on its card, if it has one here: True if shown."""
        track = self.journal.open_card(route_name, group)
        if track is None:
            return False
        self.api.update_card(track, {"state": state, "status": status})
        return True


COMMANDS = {"claim": "claim", "ack": "claim", "认领": "claim", "silence": "silence",
            "静默": "silence", "oncall": "oncall", "值班": "oncall", "open": "open",
            "告警": "open", "help": "help", "帮助": "help"}


BIGINT_MAX = 2 ** 63 - 1       # the history's incident ids are BIGINT
DINGTALK_REPLY_HOSTS = ("oapi.dingtalk.com", "api.dingtalk.com")    # where sessionWebhooks go


def incident_number(written):
    """The incident number `written` says (12, #12), or None: ASCII digits only (str.isdigit()
    also takes ² and ٣, which int() refuses) and no more than the history's BIGINT holds."""
    match = re.fullmatch(r"#?([0-9]{1,19})", written)
    number = int(match.group(1)) if match else 0
    return number if 0 < number <= BIGINT_MAX else None


def reply_allowed(webhook, api_url):
    """Whether a command's sessionWebhook may be called: https on DingTalk's own hosts, or the
    scheme, host and port of [app] api_url (a test's fake DingTalk). The message says where to
    answer; alertbridge posts the answer nowhere else."""
    try:
        parts, api = urllib.parse.urlsplit(str(webhook)), urllib.parse.urlsplit(api_url)
        origin, api_origin = (parts.scheme, parts.hostname, parts.port), (
            api.scheme, api.hostname, api.port)
    except ValueError:      # a port that is no number, a broken [address]
        return False
    if not parts.hostname or "@" in parts.netloc:
        return False
    return origin == api_origin or (parts.scheme == "https" and parts.port in (None, 443)
                                    and parts.hostname in DINGTALK_REPLY_HOSTS)


@dataclass(frozen=True)
class Chat:
    """Where a command written to the robot comes from: who wrote it (their DingTalk user id,
    and the [person] with that user_id, if any) and in which conversation (a group's
    conversationId, or a one-to-one chat's)."""
    user: str
    person: Person = None
    conversation: str = ""
    one_to_one: bool = False


class AppDesk:
    """The app's callbacks (StreamClient.handle): a card's button, a message written to the
    robot. Who clicked or wrote is their DingTalk user id: the person with that user_id, or
    the id itself. A button acts on its own card's incident. A command acts only where its chat
    may (see _refusal): in a group, on the incidents of the receivers whose app_group it is; in
    a one-to-one chat, for a [person], on the incidents of the receivers that page them; a
    silence needs a [person] and lasts [oncall] silence_max at most. Commands are answered
    through the message's sessionWebhook, if it points to DingTalk (reply_allowed)."""

    LISTED = 20         # open incidents an `open` command lists
    OPEN_READ = 1000    # open incidents it counts, per route

    WORKERS = 2             # "command" threads, started with the first command
    WAITING = 100           # commands waiting for one; more are not answered (logged)
    IDLE = 60.0             # a command thread ends after this long without a command

    def __init__(self, config, desk, store, wall, reply=None):
        self.config, self.desk, self.store, self.wall = config, desk, store, wall
        self.reply = reply or post_session_reply
        self._refused_hosts = Recent(64)     # sessionWebhook hosts refused, logged once each
        self._commands = queue.Queue(self.WAITING)
        self._workers = []

    def handle(self, topic, data):
        """A callback's answer. A card's click is answered in its acknowledgement (it updates
        the card); a command is answered through its sessionWebhook, on a thread of its own,
        so that a slow Alertmanager or reply holds no other frame of the connection."""
        if topic == CARD_CALLBACK:
            return self.click(data)
        if topic == BOT_MESSAGE:
            self._queue_command(data)
        return {}

    def _queue_command(self, data):
        self._workers = [w for w in self._workers if w.is_alive()]
        while len(self._workers) < self.WORKERS:
            self._workers.append(threading.Thread(target=self._serve_commands, daemon=True,
                                                  name=f"command-{len(self._workers) + 1}"))
            self._workers[-1].start()
        try:
            self._commands.put_nowait(data)
        except queue.Full:
            log.warning("stream: %d commands wait for an answer already: this one is not "
                        "answered", self.WAITING)

    def _serve_commands(self):
        """Answer commands until none came for IDLE seconds, or stop()."""
        while True:
            try:
                data = self._commands.get(timeout=self.IDLE)
            except queue.Empty:
                return
            if data is None:
                return
            self.command(data)

    def stop(self):
        for _ in self._workers:
            with contextlib.suppress(queue.Full):
                self._commands.put_nowait(None)

    def workers(self):
        """The command threads alive now."""
        return [w for w in self._workers if w.is_alive()]

    def person_of(self, user_id):
        """The [person] whose user_id this is, or None (for no user id too: a person with a
        mobile alone has none)."""
        return next((p for p in self.config().people.values()
                     if user_id and p.user_id == user_id), None)

    def who(self, user_id):
        """(handle or user id, name) of a DingTalk user."""
        person = self.person_of(user_id)
        return (person.handle, person.name) if person else (user_id, user_id)

    def click(self, data):
        """A card's button: claim, silence_1h, silence_4h. The answer updates the card."""
        found = read_track(data.get("outTrackId", ""))
        user = str(data.get("userId", ""))[:64]
        try:
            content = json.loads(data.get("content") or "{}")
            private = content.get("cardPrivateData") or {}
            action = (private.get("actionIds") or [""])[0] or private.get("params", {}).get(
                "action", "")
        except (ValueError, AttributeError, TypeError):
            action = ""
        if found is None or not user:
            log.warning("stream: a card click without a card of ours or a user: ignored")
            return {}
        route, group = found
        chosen, name = self.who(user)
        try:
            status = self._act(route, group, str(action), chosen, name,
                               self.person_of(user) is not None)
        except Exception as exc:  # noqa: BLE001 (the clicker is told, on the card)
            log.error("stream: the card's %r failed: %s: %s", str(action)[:40],
                      type(exc).__name__, exc, exc_info=exc)
            status = {"status": not_done(exc, self._language(route))}
        return {"cardData": {"cardParamMap": status}}

    def _act(self, route, group, action, chosen, name, known):
        """A button of the card: anyone in the group may claim (as a link's page lets them);
        a silence, which mutes the alerts for everyone, needs a [person] (`known`), as the
        command does."""
        language = self._language(route)
        try:
            if action == "claim":
                incident = self.desk.claim(route, group, chosen, name, "dingtalk")
                if incident is None:
                    return {"status": answer(language, "card_nothing")}
                holder = self.config().name_of(incident["acknowledged_by"])
                return {"state": "claimed", "status": WORDS[language]["has_it"].format(
                    name=holder, after=Desk.taken(incident))}
            hours = {"silence_1h": 1, "silence_4h": 4}.get(action)
            if hours is None:
                return {}
            if not known:
                return {"status": answer(language, "person_only")}
            longest = self.config().oncall.silence_max
            if hours * 3600 > longest:
                return {"status": answer(language, "silence_max",
                                         longest=format_duration(longest))}
            self.desk.silence(route, group, hours, chosen, name, "dingtalk")
            return {"state": "silenced", "status": WORDS[language]["silenced_card"].format(
                name=name, hours=hours)}
        except DeskRefused as exc:
            return {"status": exc.say(language)}

    def _language(self, route):
        return language_of(self.config(), route)

    def command(self, data):
        """A message written to the robot: claim N, silence N 1h, oncall, open (in Chinese
        too); anything else gets the help."""
        text = str((data.get("text") or {}).get("content", "")).strip()
        chat = self.chat_of(data)
        try:
            answer = self.answer_to(text, chat)
        except Exception as exc:  # noqa: BLE001 (whoever wrote is told, not left waiting)
            log.error("stream: the command %r failed: %s: %s", text[:40], type(exc).__name__,
                      exc, exc_info=exc)
            answer = not_done(exc, self._chat_language(chat))
        self._reply(data.get("sessionWebhook") or "", answer)

    def chat_of(self, data):
        """The Chat a robot message comes from. Who wrote it is their senderStaffId, the user
        id a [person] has; senderId is only the robot's alias for them (someone outside the
        organization has no other), and acts as nobody."""
        staff = str(data.get("senderStaffId") or "")[:64]
        return Chat(user=staff, person=self.person_of(staff),
                    conversation=str(data.get("conversationId", ""))[:128],
                    one_to_one=str(data.get("conversationType", "")) == "1")

    def _reply(self, webhook, text):
        """The answer, through the message's sessionWebhook where reply_allowed; a host refused
        is logged once, by its name alone (the URL's query is the session's credential)."""
        app = self.config().app
        if reply_allowed(webhook, app.api_url):
            self.reply(webhook, text, app.timeout)
            return
        try:
            host = urllib.parse.urlsplit(str(webhook)).hostname or ""
        except ValueError:
            host = ""
        if webhook and self._refused_hosts.get(host) is None:
            self._refused_hosts.put(host, True)
            log.warning("stream: a command's sessionWebhook points to host=%s, neither DingTalk "
                        "nor [app] api_url: not answered", logfmt(host[:64] or "?"))

    def answer_to(self, text, chat):
        words = text.split()
        command = COMMANDS.get(words[0].lower(), "help") if words else "help"
        if command == "oncall":
            return self._on_call()
        if command == "open":
            everywhere = len(words) > 1 and words[1].lower() in ("all", "全部")
            return self._open(() if everywhere else self._routes_of(chat.conversation))
        if command in ("claim", "silence") and len(words) >= 2 and words[1].lstrip("#").isdigit():
            return self._act_on(command, words[1].lstrip("#")[:24], words[2:3], chat)
        here = chat.conversation and not chat.one_to_one
        return ("claim N / 认领 N · silence N 1h / 静默 N 1h · oncall / 值班 · open / 告警 "
                "(open all / 告警 全部)" + (f"\napp_group = {chat.conversation}" if here else ""))

    def _act_on(self, command, written, duration, chat):
        """claim N, silence N [DURATION] (1h if not written), if this chat may act on #N."""
        number = incident_number(written)
        incident = self._incident(number) if number is not None else None
        if incident is None:
            return answer(self._chat_language(chat), "no_incident", number=written)
        refused = self._refusal(command, incident, chat)
        if refused:
            return refused
        chosen, name = self.who(chat.user)
        if command == "claim":
            return self._claim(incident, chosen, name)
        return self._silence(incident, duration[0] if duration else "1h", chosen, name)

    def _refusal(self, command, incident, chat):
        """Why this chat may not act on the incident ("" if it may). Incident numbers count up
        from 1: a number alone proves nothing, where it is written does. In a group: the
        incidents of the receivers whose app_group it is. One to one: a [person]'s, on the
        incidents of the receivers that page them (pages_person). A silence, which mutes the
        alerts for everyone: a [person] only."""
        number, language = f"#{incident['id']}", self._chat_language(chat)
        if not chat.user:
            return answer(language, "unknown_writer")
        if chat.one_to_one:
            if chat.person is None:
                return answer(language, "one_to_one")
            route = self.config().routes.get(incident["route"])
            if route is None or not pages_person(route, chat.person):
                return answer(language, "not_yours", number=number, route=incident["route"])
        elif incident["route"] not in self._routes_of(chat.conversation):
            return answer(language, "not_this_group", number=number)
        if command == "silence" and chat.person is None:
            return answer(language, "person_only")
        return ""

    def _chat_language(self, chat):
        """A command's answers: in the language of the group's receivers (of every receiver in
        a one-to-one chat)."""
        return self._routes_language(() if chat.one_to_one else
                                     self._routes_of(chat.conversation))

    def _claim(self, incident, chosen, name):
        taken = self.desk.claim(incident["route"], incident["group_hash"], chosen, name,
                                "dingtalk")
        language = self._language(incident["route"])
        if taken is None:
            return answer(language, "not_open", id=incident["id"])
        return answer(language, "holder", id=incident["id"],
                      holder=self.config().name_of(taken["acknowledged_by"]))

    def _silence(self, incident, written, chosen, name):
        """An Alertmanager silence of `written` (any duration duration_seconds reads), from 1m
        to [oncall] silence_max."""
        longest, language = self.config().oncall.silence_max, self._language(incident["route"])
        seconds = duration_seconds(written)
        if seconds is None or not 60 <= seconds <= longest:
            return answer(language, "silence_range", longest=format_duration(longest),
                          id=incident["id"])
        try:
            _, silence = self.desk.silence(incident["route"], incident["group_hash"],
                                           seconds / 3600, chosen, name, "dingtalk")
        except DeskRefused as exc:
            return exc.say(language)
        return answer(language, "silenced_cmd", id=incident["id"],
                      duration=format_duration(seconds), silence=silence)

    def _incident(self, number):
        found = self.store.incident(number)
        return found if found and found["state"] != "resolved" else None

    def _on_call(self):
        config = self.config()
        report = on_call_report(config.rotations.values(), self.wall(), config.tz)
        language = language_of(config)
        if not report:
            return answer(language, "no_rotation")
        return "\n".join(answer(language, "shift", rotation=rotation.name, person=person.name,
                                until=f"{datetime.fromtimestamp(until, config.tz):%m-%d %H:%M}",
                                next=following.name)
                         for rotation, (person, until), (following, _) in report)

    def _routes_of(self, conversation):
        """The routes whose cards go to this group (app_group): what `open` lists there."""
        return tuple(sorted(r.name for r in self.config().routes.values()
                            if conversation and r.app_group == conversation))

    def _open(self, routes):
        """The open incidents of these routes (every route's if none): the LISTED newest, and
        how many older ones, and elsewhere, there are."""
        if routes:
            found = sorted((i for route in routes
                            for i in self.store.open_incidents(self.OPEN_READ, route)),
                           key=lambda i: -i["id"])
            elsewhere = sum(self.store.open_by_state().values()) - len(found)
        else:
            found, elsewhere = self.store.open_incidents(self.OPEN_READ), 0
        name_of, language = self.config().name_of, self._routes_language(routes)
        lines = [f"#{i['id']} {i['title'][:60]} · {answer(language, i['state'])}"
                 + (f" · {name_of(i['acknowledged_by'])}" if i["acknowledged_by"] else "")
                 for i in found[:self.LISTED]] or [
                     answer(language, "nothing_here" if routes else "nothing_anywhere")]
        if len(found) > self.LISTED:
            lines.append(answer(language, "older", count=len(found) - self.LISTED))
        if elsewhere > 0:
            lines.append(answer(language, "elsewhere", count=elsewhere))
        return "\n".join(lines)

    def _routes_language(self, routes):
        """The language these routes share, else the receivers' (language_of)."""
        languages = {self._language(route) for route in routes}
        return languages.pop() if len(languages) == 1 else language_of(self.config())


def not_done(exc, language):
    """What someone who clicked or wrote is told when it failed here (the history away...), in
    their `language`."""
    return answer(language, "not_done", error=f"{type(exc).__name__}: {str(exc)[:200]}")


def post_session_reply(webhook, text, timeout):
    """Answer a message written to the robot, through its sessionWebhook (valid for a while)."""
    try:
        status, _ = exchange_json("POST", webhook, {"msgtype": "text", "text": {"content": text}},
                                  timeout=timeout, limit=4096)
    except NO_ANSWER as exc:
        log.warning("stream: the reply to a command was not delivered: %s", _no_answer(exc))
        return
    if status >= 400:
        log.warning("stream: the reply to a command was not delivered: HTTP %d", status)


if __name__ == "__main__":
    sys.exit(main())
