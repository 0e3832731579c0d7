#!/usr/bin/env python3
"""Drive the worker through real Celery, as the Zimfarm dispatcher does.

The Rust integration tests run this with the venv that scripts/test-env.sh
builds. Every subcommand takes --broker (a full AMQP URL, vhost included)
and writes JSON objects on stdout, one per line, flushed at once, so that a
test can read them while the command still runs.

  send         send one task with Celery's own send_task(), optionally
               waiting for its rpc:// result
  events       listen to the worker's events on the celeryev exchange, as
               the dispatcher's monitor and Flower do, and sum them up
  publish-raw  publish arbitrary bytes, for malformed-message tests
  control      broadcast a remote-control command with app.control.broadcast()
               and print the replies: {"replies": [{node: reply}, ...]}
  revoke       revoke task(s) with app.control.revoke(), as the dispatcher
               does, and print the replies (with --reply)

Lines that `events` writes besides the events themselves (each printed as
published, plus `local_received`):
  {"ready": true}           consuming: events sent from now on arrive here
  {"disconnected": "..."}   the connection was lost; it reconnects by itself
  {"reconnected": n}        consuming again after the n-th reconnection
  {"warning": "...", ...}   a warning logged by Celery (e.g. clock drift)
  {"summary": {...}}        last line: Celery's State of workers and tasks
It ends after --seconds, after the --until-* event (+ --count-after-until),
or on SIGTERM/SIGINT, always with the summary and exit code 0.
"""

import argparse
import datetime
import json
import logging
import signal
import sys
import time
import uuid

import kombu
import kombu.exceptions
from celery import Celery
from celery.signals import before_task_publish
from celery.events.receiver import EventReceiver


def print_json(obj):
    """Write one JSON line on stdout and flush it."""
    sys.stdout.write(json.dumps(obj, default=repr) + "\n")
    sys.stdout.flush()


def json_arg(text):
    """argparse type: a JSON document."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON: {exc}") from exc


# --------------------------------------------------------------------- send


def cmd_send(opts):
    app = Celery(broker=opts.broker, backend="rpc://" if opts.rpc else None)
    app.conf.task_protocol = opts.protocol
    # Publisher confirms: when this command returns, the broker holds the
    # message (or said why not). Nothing changes in the message itself.
    app.conf.broker_transport_options = {"confirm_publish": True}

    options = {
        "exchange": opts.exchange,
        "routing_key": opts.routing_key,
    }
    if opts.expires is not None:
        if opts.expires < 0:
            # Celery only turns a number into "now + n seconds"; a moment
            # in the past has to be given as a datetime.
            now = datetime.datetime.now(datetime.timezone.utc)
            options["expires"] = now + datetime.timedelta(seconds=opts.expires)
        else:
            options["expires"] = opts.expires
    if opts.countdown is not None:
        options["countdown"] = opts.countdown
    if opts.time_limit is not None:
        options["time_limit"] = opts.time_limit

    if opts.no_message_ttl:
        # Celery 5 copies `expires` into the AMQP `expiration` property, so
        # RabbitMQ itself drops the message once it expires while queued (at
        # once for an expiry in the past, unless a consumer takes it). Celery
        # 4, which the 2019 dispatcher used, did not: the worker had to see
        # the expired message and revoke it.
        def drop_expiration(properties=None, **_):
            properties.pop("expiration", None)

        before_task_publish.connect(drop_expiration, weak=False)

    # Several ids: the same task sent once per id, back to back, so that a
    # test can queue a batch in the time of one Python start.
    for task_id in opts.task_id:
        result = app.send_task(
            opts.name, args=opts.args, kwargs=opts.kwargs, task_id=task_id, **options
        )

    if opts.rpc and opts.wait is not None:
        try:
            value = result.get(timeout=opts.wait)
        except Exception as exc:  # the task's own failure, a revoke, a timeout
            print_json({"status": "FAILURE", "exc_type": type(exc).__name__, "exc": str(exc)})
        else:
            print_json({"status": result.state, "result": value})
    else:
        print_json({"sent": result.id})
    return 0


# ------------------------------------------------------------------- events


class WarningLines(logging.Handler):
    """Turns log records (clock drift, lost connections) into JSON lines."""

    def emit(self, record):
        print_json({"warning": record.getMessage(), "logger": record.name})


class ListeningReceiver(EventReceiver):
    """An EventReceiver that reports to an EventListener.

    Celery's EventReceiver.capture() does not reconnect: a closed connection
    ends it with an exception (only kombu's ConsumerMixin.run() loops, with
    waits of its own). EventListener.run() does the reconnecting instead, so
    this class only adds hooks.
    """

    def __init__(self, *args, listener, **kwargs):
        self.listener = listener
        super().__init__(*args, **kwargs)

    def on_consume_ready(self, connection, channel, consumers, **kwargs):
        # The queue is declared, bound and consumed from at this point.
        super().on_consume_ready(connection, channel, consumers, **kwargs)
        self.listener.on_consuming()

    def on_iteration(self):
        # Runs before each wait for messages, at least every safety interval.
        if self.listener.finished():
            self.should_stop = True

    def on_connection_error(self, exc, interval):
        # Fail at once instead of letting kombu retry with growing waits:
        # EventListener.run() retries at its own pace and knows the deadline.
        raise exc

    def event_from_message(self, body, *args, **kwargs):
        # Keep the event as the worker published it: the receiver rewrites
        # `timestamp` (to local time) and sometimes `clock` in place.
        self.listener.wire_event = dict(body)
        return super().event_from_message(body, *args, **kwargs)


class EventListener:
    """Prints every event, feeds Celery's State, stops when told to."""

    def __init__(self, app, opts):
        self.app = app
        self.state = app.events.State()
        self.wakeup = not opts.no_wakeup
        self.until_type = opts.until_type
        self.until_uuid = opts.until_uuid
        self.count_after_until = opts.count_after_until
        self.until_reached = False
        self.deadline = time.monotonic() + opts.seconds
        self.connections = 0
        self.wire_event = None
        # One queue name for the whole run, so a reconnect finds it again.
        self.node_id = opts.queue_id or str(uuid.uuid4())
        self.durable = opts.queue_id is not None
        if self.durable:
            # A named queue that outlives the connection must also keep
            # what arrives meanwhile: no message TTL, no queue expiry.
            app.conf.event_queue_ttl = None
            app.conf.event_queue_expires = None

    def finished(self):
        return time.monotonic() >= self.deadline

    def stop(self, *_):
        """Signal handler: end the run at the next check, summary included."""
        self.deadline = time.monotonic()

    def on_consuming(self):
        self.connections += 1
        if self.connections == 1:
            print_json({"ready": True})
        else:
            print_json({"reconnected": self.connections - 1})

    def on_event(self, event):
        wire = self.wire_event if self.wire_event is not None else dict(event)
        self.wire_event = None
        wire["local_received"] = event.get("local_received")
        print_json(wire)
        self.state.event(event)
        if self.until_type or self.until_uuid:
            if not self.until_reached and self.matches_until(wire):
                self.until_reached = True
                self.deadline = min(self.deadline, time.monotonic() + self.count_after_until)

    def matches_until(self, event):
        if self.until_type and event.get("type") != self.until_type:
            return False
        if self.until_uuid and event.get("uuid") != self.until_uuid:
            return False
        return True

    def run(self):
        probe = self.app.connection_for_read()
        errors = (
            probe.connection_errors
            + probe.channel_errors
            + (OSError, kombu.exceptions.OperationalError)
        )
        reported_after = None  # value of self.connections at the last report
        while not self.finished():
            try:
                with self.app.connection_for_read() as conn:
                    conn.connect()
                    receiver = ListeningReceiver(
                        conn,
                        handlers={"*": self.on_event},
                        app=self.app,
                        node_id=self.node_id,
                        queue_durable=self.durable,
                        queue_exclusive=not self.durable,
                        listener=self,
                    )
                    for _ in receiver.consume(safety_interval=0.2, wakeup=self.wakeup):
                        pass
            except errors as exc:
                # One line per outage, not one per attempt to reconnect.
                error = f"{type(exc).__name__}: {exc}"
                if self.connections != reported_after:
                    print_json({"disconnected": error})
                    reported_after = self.connections
                time.sleep(0.5)

    def summary(self):
        workers = {name: {"alive": worker.alive} for name, worker in self.state.workers.items()}
        tasks = {
            task_id: {
                "state": task.state,
                "result": task.result,
                "name": task.name,
                "exception": task.exception,
            }
            for task_id, task in self.state.tasks.items()
        }
        summary = {"workers": workers, "tasks": tasks}
        if self.until_type or self.until_uuid:
            summary["until_reached"] = self.until_reached
        return summary


def cmd_events(opts):
    root = logging.getLogger()
    root.addHandler(WarningLines(level=logging.WARNING))
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)

    app = Celery(broker=opts.broker)
    listener = EventListener(app, opts)
    signal.signal(signal.SIGTERM, listener.stop)
    signal.signal(signal.SIGINT, listener.stop)
    try:
        listener.run()
    finally:
        print_json({"summary": listener.summary()})
    return 0


# -------------------------------------------------------------- publish-raw


def cmd_publish_raw(opts):
    if opts.body_file == "-":
        body = sys.stdin.buffer.read()
    else:
        with open(opts.body_file, "rb") as f:
            body = f.read()
    # JSON values become AMQP table values (py-amqp's choice): str S,
    # int I (L beyond 32 bits), float d, bool t, null V, list A, object F.
    headers = opts.headers or {}
    properties = opts.properties or {}
    with kombu.Connection(opts.broker, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            exchange=opts.exchange,
            routing_key=opts.routing_key,
            headers=headers,
            content_type=opts.content_type,
            content_encoding=opts.content_encoding,
            retry=False,
            **properties,
        )
    print_json({"published": len(body)})
    return 0


# ------------------------------------------------------------ remote control


def cmd_control(opts):
    app = Celery(broker=opts.broker)
    replies = app.control.broadcast(
        opts.method,
        arguments=opts.arguments or {},
        destination=opts.destination,
        reply=not opts.no_reply,
        timeout=opts.timeout,
    )
    print_json({"replies": replies})
    return 0


def cmd_revoke(opts):
    app = Celery(broker=opts.broker)
    task_id = opts.task_id[0] if len(opts.task_id) == 1 else opts.task_id
    kwargs = {"terminate": opts.terminate, "reply": opts.reply, "timeout": opts.timeout}
    if opts.signal is not None:
        kwargs["signal"] = opts.signal
    replies = app.control.revoke(task_id, destination=opts.destination, **kwargs)
    print_json({"replies": replies})
    return 0


# --------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--broker", required=True, help="AMQP URL, vhost included")
        return sub

    send = command("send", "send a task with app.send_task()")
    send.add_argument("--name", required=True, help="task name, e.g. offliner.mwoffliner")
    send.add_argument("--kwargs", type=json_arg, default={}, help="JSON object")
    send.add_argument("--args", type=json_arg, default=None, help="JSON array")
    send.add_argument("--task-id", action="append", required=True, help="repeat for more")
    send.add_argument("--exchange", default="offliner")
    send.add_argument("--routing-key", default="small")
    send.add_argument("--protocol", type=int, choices=(1, 2), default=2)
    send.add_argument(
        "--expires", type=float, help="seconds from now; negative: already expired"
    )
    send.add_argument(
        "--no-message-ttl",
        action="store_true",
        help="with --expires: leave out the AMQP expiration property (as Celery 4 did)",
    )
    send.add_argument("--countdown", type=float, help="seconds until the task's eta")
    send.add_argument("--time-limit", type=float, help="hard time limit, seconds")
    send.add_argument("--rpc", action="store_true", help="use the rpc:// result backend")
    send.add_argument("--wait", type=float, help="with --rpc: wait this long for the result")
    send.set_defaults(run=cmd_send)

    events = command("events", "print the events on celeryev as JSON lines")
    events.add_argument("--seconds", type=float, default=60, help="listen at most this long")
    events.add_argument("--until-type", help="stop once an event of this type arrived")
    events.add_argument("--until-uuid", help="stop once an event of this task arrived")
    events.add_argument(
        "--count-after-until",
        type=float,
        default=0,
        help="keep listening this long after the --until event (to see duplicates)",
    )
    events.add_argument(
        "--queue-id",
        help="use the durable queue celeryev.QUEUE_ID, which keeps events "
        "arriving while disconnected (default: a fresh auto-delete queue)",
    )
    events.add_argument(
        "--no-wakeup",
        action="store_true",
        help="do not broadcast the 'heartbeat' control command when consuming starts",
    )
    events.set_defaults(run=cmd_events)

    raw = command("publish-raw", "publish raw bytes")
    raw.add_argument("--exchange", default="", help="default: the default exchange")
    raw.add_argument("--routing-key", required=True)
    raw.add_argument("--body-file", required=True, help="file with the body; - for stdin")
    raw.add_argument("--headers", type=json_arg, help="JSON object of AMQP headers")
    raw.add_argument("--content-type", default="application/json")
    raw.add_argument("--content-encoding", default="utf-8")
    raw.add_argument(
        "--properties",
        type=json_arg,
        help="JSON object of message properties (delivery_mode, reply_to, correlation_id, ...)",
    )
    raw.set_defaults(run=cmd_publish_raw)

    control = command("control", "broadcast a remote-control command")
    control.add_argument("--method", required=True, help="e.g. ping, stats, add_consumer")
    control.add_argument("--arguments", type=json_arg, help="JSON object of keyword arguments")
    control.add_argument(
        "--destination", action="append", help="node name (repeat for more); default: all"
    )
    control.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for replies")
    control.add_argument("--no-reply", action="store_true", help="send it as a cast")
    control.set_defaults(run=cmd_control)

    revoke = command("revoke", "revoke tasks with app.control.revoke()")
    revoke.add_argument("--task-id", action="append", required=True, help="repeat for more")
    revoke.add_argument("--terminate", action="store_true")
    revoke.add_argument("--signal", help="e.g. SIGKILL (Celery's default: SIGTERM)")
    revoke.add_argument("--destination", action="append", help="node name; default: all")
    revoke.add_argument("--reply", action="store_true", help="wait for the replies")
    revoke.add_argument("--timeout", type=float, default=2.0)
    revoke.set_defaults(run=cmd_revoke)

    opts = parser.parse_args(argv)
    if opts.command == "send" and opts.wait is not None and not opts.rpc:
        parser.error("--wait needs --rpc")
    return opts


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    return opts.run(opts)


if __name__ == "__main__":
    sys.exit(main())
