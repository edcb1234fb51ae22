"""The obvious design, measured beside the hub as a reference (``--phases obvious``).

What a team writes in a day on the same stack (aiohttp, Celery, Redis), with none of the hub's
batching: the ingress (``ingress.py``) verifies the signature, stores the event in Redis and
calls ``send_task`` once per subscriber; the worker (``app.py``) runs one Celery task per
(event, subscriber) that posts the stored body with ``requests`` and retries with
``self.retry(countdown=...)``. It uses the bench's private redis-server (database 1, its own
queue name, so nothing it writes, kombu's bookkeeping included, meets the hub's keys), the
same sinks and the same worker pool and concurrency as the hub.

Both processes read their settings from the JSON file named by ``OBVIOUS_CONFIG``::

    {"redis": "redis://127.0.0.1:PORT/1", "queue": "obvious", "secret": "ingress secret",
     "subscribers": [{"url": "http://127.0.0.1:P/s/0", "secret": "..."}, ...],
     "timeout": 10, "max_retries": 7}
"""
