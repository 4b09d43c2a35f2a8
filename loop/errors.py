"""The errors selfloop raises on purpose, and the exit codes they map to."""


class SelfloopError(Exception):
    """Base of every error selfloop raises on purpose."""

    exit_code = 1


class UserError(SelfloopError):
    """Bad input from the user: a config, a path, a plugin name. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override is invalid.

    ``str(err)`` is one line naming the file, the field and what would fix it.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        prefix = ""
        if file:
            prefix += f"{file}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class PluginError(UserError):
    """A plugin could not be loaded, or two plugins claim the same component name."""


class RunLocked(UserError):
    """Another live process is writing to this run directory."""


class PhaseFailed(SelfloopError):
    """A component raised inside a phase; the phase is marked failed and can be resumed."""

    def __init__(self, message: str, *, plugin: str | None = None):
        self.plugin = plugin
        super().__init__(message)
