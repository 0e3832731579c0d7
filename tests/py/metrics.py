"""Scrapes a worker's /metrics as Prometheus does and prints the samples.

Usage: metrics.py URL

Parses the page with prometheus_client's Prometheus text parser and with
its strict OpenMetrics parser (the page's declared format); either one
failing is an error (exit 1). Prints one JSON object on stdout:
{"content_type": ..., "families": {name: type}, "samples": [{"name", "labels", "value"}]}
"""

import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families


def main() -> int:
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=10) as reply:
        content_type = reply.headers.get("Content-Type", "")
        text = reply.read().decode("utf-8")
    try:
        strict = list(openmetrics_families(text))
    except ValueError as error:
        print(f"not valid OpenMetrics text: {error}\n{text}", file=sys.stderr)
        return 1
    try:
        families = list(prometheus_families(text))
    except ValueError as error:
        print(f"not valid Prometheus text: {error}\n{text}", file=sys.stderr)
        return 1
    samples = [
        {"name": s.name, "labels": s.labels, "value": s.value}
        for family in families
        for s in family.samples
    ]
    strict_samples = sum(len(f.samples) for f in strict)
    if strict_samples != len(samples):
        print(
            f"the two parsers disagree: {strict_samples} vs {len(samples)} samples\n{text}",
            file=sys.stderr,
        )
        return 1
    print(
        json.dumps(
            {
                "content_type": content_type,
                "families": {f.name: f.type for f in strict},
                "samples": samples,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
