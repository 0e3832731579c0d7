#!/usr/bin/env python3
"""A Celery 5 worker whose offliner.mwoffliner task does nothing.

It is set up like the 2019 Zimfarm worker (late acks, one message per
process, task events on, queue `small` bound to the topic exchange
`offliner`), so that the benchmark can compare the Rust worker's overhead
per task with Celery's own.

    python tests/py/noop_celery_worker.py --broker URL --concurrency 2 --hostname NAME
"""

import argparse
import sys

from celery import Celery
from kombu import Exchange, Queue

QUEUE = "small"


def make_app(broker):
    app = Celery("noop_celery_worker", broker=broker)
    offliner = Exchange("offliner", type="topic", durable=True)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=False,
        task_queues=[Queue(QUEUE, offliner, routing_key=QUEUE, durable=True)],
    )

    @app.task(name="offliner.mwoffliner")
    def mwoffliner(*args, **kwargs):
        return []

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="AMQP URL, vhost included")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--hostname", required=True, help="Celery node name, e.g. user@node")
    opts = parser.parse_args()

    app = make_app(opts.broker)
    app.worker_main(
        argv=[
            "worker",
            "--pool", "prefork",
            "--concurrency", str(opts.concurrency),
            "--hostname", opts.hostname,
            "-Q", QUEUE,
            "-E",
            "--without-gossip",
            "--without-mingle",
            "-l", "WARNING",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
