"""What the serving hosts raise when an artifact cannot serve."""


class HandlerSetupError(Exception):
    """The artifact cannot serve: no Ray Serve app, a config that names none, or a module without a replica."""
