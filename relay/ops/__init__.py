"""What operators run and read: the ``relay`` command (the composition root), ``relay up``,
``relay send`` and the demo sink, and the read models the admin and the CLI share (an event's
timeline, dead letters, hub status, what ordered delivery holds back)."""
