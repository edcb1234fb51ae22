"""Order-event relay: the ingress and what the ingress and the workers share."""

__version__ = "0.1.0"
