"""Errors of the relay, in one place so callers can catch them by meaning."""


class RelayError(Exception):
    """Base class of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration file is unreadable or invalid; the message names file, key and reason."""


class SignatureError(RelayError):
    """A signature is missing, malformed or does not match any configured secret."""


class EnvelopeError(RelayError):
    """A body is not JSON or not a valid Ingram Micro envelope; the message names the JSON path."""
