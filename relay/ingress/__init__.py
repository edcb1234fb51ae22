"""The HTTP ingress: verify, validate, dedupe, store, answer."""
