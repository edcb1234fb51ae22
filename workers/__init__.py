"""The Celery side: fan-out, delivery, retry scheduling, dead letters."""
