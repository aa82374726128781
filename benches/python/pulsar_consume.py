"""Pulsar's own consumer (Apache's C++-based Python client), the baseline
for `tickwire-bench pulsar`: receives and acknowledges messages on its own
subscription and prints one JSON line with its figures.

Usage: pulsar_consume.py URL TOPIC SUBSCRIPTION TYPE RECEIVER_QUEUE COUNT LATENCY(0|1|2) [IDLE_MS]

IDLE_MS (default 30000): stop when nothing arrives for this long (a member
of a group does not know how many messages it will get). first_mono_ns and
last_mono_ns are CLOCK_MONOTONIC, comparable across the group's processes.
"""
import json
import sys
import time

import pulsar


def main():
    url, topic, sub, kind, rq, count, latency = sys.argv[1:8]
    count, rq, mode = int(count), int(rq), int(latency)
    latency = mode >= 1  # 2: also print every latency (a group merges its members')
    idle_ms = int(sys.argv[8]) if len(sys.argv) > 8 else 30000
    types = {"failover": pulsar.ConsumerType.Failover, "shared": pulsar.ConsumerType.Shared,
             "exclusive": pulsar.ConsumerType.Exclusive, "key_shared": pulsar.ConsumerType.KeyShared}
    client = pulsar.Client(url, operation_timeout_seconds=30)
    consumer = client.subscribe(topic, sub, consumer_type=types[kind], receiver_queue_size=rq,
                                initial_position=pulsar.InitialPosition.Earliest)
    print("READY", flush=True)
    n, lat, first, last, redelivered = 0, [], None, None, 0
    while n < count:
        try:
            msg = consumer.receive(timeout_millis=idle_ms)
        except Exception:  # timeout: the producer is done
            break
        now = time.time_ns()
        if first is None:
            first = time.monotonic_ns()
        last = time.monotonic_ns()
        if msg.redelivery_count() > 0:
            redelivered += 1
        if latency:
            lat.append(now - json.loads(msg.data())["timestamp_ns"])
        consumer.acknowledge(msg)
        n += 1
    last = last or time.monotonic_ns()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0
    print(json.dumps({"events": n, "elapsed_ns": (last - (first or last)) or 1,
                      "p50_ns": q(0.5), "p99_ns": q(0.99), "p999_ns": q(0.999), "max_ns": lat[-1] if lat else 0,
                      "first_mono_ns": first or 0, "last_mono_ns": last, "redelivered": redelivered,
                      "latencies_ns": lat if mode == 2 else None}), flush=True)
    client.close()


if __name__ == "__main__":
    main()
