"""The one exception users see: what went wrong, where (file, line or particle), what was expected."""

from __future__ import annotations


class ParticleError(ValueError):
    """Bad input or an unsafe output request, with a message meant for a person.

    The CLI prints ``str(error)`` on stderr without a traceback and exits with status 1.
    """

    def __init__(self, message: str, *, path: object | None = None, particle: int | None = None,
                 line: int | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if particle is not None:
            where.append(f"particle {particle}")
        self.message = message  # without the place: the error can be raised again with more of it
        self.path = path
        self.particle = particle
        self.line = line
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
